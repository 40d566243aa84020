"""The checkpoint folder's format: its name, its manifest, and how to verify it (the one owner of both).

A checkpoint is a folder ``step_NNNNNNNN/``::

    manifest.json                  every file's size and sha256 (each computed by the rank that wrote the file),
                                   the format, step and layout (written last, by rank 0)
    trainer.json                   trainer counters, LR schedule, loader position, validation and guard state,
                                   optimizer step, the resolved config and the layout
    model/tp{T}_pp{P}_dp{D}.safetensors  each rank's share of the model and optimizer state, and beside it
    model/tp{T}_pp{P}_dp{D}.sums.json    the sha256 of each of its 1 MiB chunks (``training.checkpoint.shards``)
    rng/rank{R}.safetensors        each rank's RNG states

Format 1 (``model/tp{T}_pp{P}.safetensors``, one file per TP x PP slice written by DP rank 0) still loads.

:func:`check_checkpoint` is the cheap check made before a resume (every file present with its size, the small
files hashed); the model files are verified chunk by chunk by the ranks that read them. :func:`verify_checkpoint`
re-hashes every file (``shardforge checkpoint verify``), in parallel over files.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.files import fsync_file, sha256_file

FORMAT = "shardforge-checkpoint/2"
FORMAT_1 = "shardforge-checkpoint/1"


def write_manifest(folder: Path, manifest: dict) -> None:
    """``folder/manifest.json``, fsynced (the checkpoint folder is renamed into place after it)."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    fsync_file(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def verify_checkpoint(path: Path, deep: bool = True) -> list[str]:
    """One line per problem with a checkpoint folder (empty when every file matches its manifest). With ``deep``
    False, format-2 model files are checked for presence and size only (their readers verify their chunks)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return [f"{path}: no manifest.json (incomplete checkpoint)"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return [f"{manifest_path}: not a valid checkpoint manifest"]
    shallow = not deep and manifest.get("format") == FORMAT
    problems, to_hash = [], []
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != meta["bytes"]:
            problems.append(f"{f}: size {f.stat().st_size} != manifest {meta['bytes']}")
        elif not (shallow and rel.startswith("model/") and rel.endswith(".safetensors")):
            to_hash.append((f, meta["sha256"]))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = list(pool.map(lambda item: sha256_file(item[0]), to_hash))
    problems += [f"{f}: sha256 does not match the manifest (corrupt)" for (f, want), got in zip(to_hash, digests)
                 if got != want]  # fmt: skip
    return problems


def check_checkpoint(path: Path) -> list[str]:
    """The cheap check before a resume: :func:`verify_checkpoint` without re-hashing format-2 model files."""
    return verify_checkpoint(path, deep=False)


def read_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())
