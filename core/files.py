"""File primitives every package shares: atomic writes, folder publication, fsync and streaming sha256.

A reader never sees a half-written file or folder: files are written to a temporary name, fsynced, then renamed;
folders are built under a temporary name and published with one rename (:func:`publish_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import ConfigError


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in ``chunk``-byte blocks (never whole in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_text_atomic(path: str | Path, text: str, durable: bool = True) -> None:
    """Write text to ``path`` through a temporary file, fsync (unless not ``durable``: a file rewritten often,
    where losing the last version to a power cut costs little), then rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: object, indent: int = 2, durable: bool = True) -> None:
    """Write JSON (with a final newline) to ``path`` through a temporary file, fsync, then rename."""
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n", durable)


@contextmanager
def staged_output(out: str | Path, overwrite: bool, what: str = "--out") -> Iterator[Path]:
    """Build the folder ``out`` in a temporary folder beside it: ``with staged_output(out, ...) as tmp:`` yields
    the empty temporary folder, publishes it as ``out`` when the block ends, and removes it if the block raises.
    A non-empty ``out`` is refused before any work unless ``overwrite``."""
    tmp = staging_dir(out, overwrite, what)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out, overwrite=True)


def staging_dir(out: str | Path, overwrite: bool, what: str = "--out") -> Path:
    """A fresh, empty temporary folder beside ``out`` to build it in; refuses a non-empty ``out`` unless
    ``overwrite``. Publish it with :func:`publish_dir`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{what} '{out}' exists and is not empty", fix="choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: str | Path, out: str | Path, overwrite: bool = True) -> Path:
    """Move the finished folder ``tmp`` to ``out`` with one rename; an old ``out`` (only with ``overwrite``) is
    moved aside first and removed after the swap, so ``out`` is always either the old or the new folder."""
    tmp, out = Path(tmp), Path(out)
    old = None
    if out.exists():
        if not overwrite:
            raise ConfigError(f"'{out}' exists", fix="choose another folder or pass --overwrite")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
