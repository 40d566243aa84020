"""A dataset manifest parsed once per process and kept compact: each split's shard list as arrays.

``manifest.json`` lists every shard as a JSON object (path, samples, tokens, bytes, sha256, index_sha256); for a
10 TB corpus that is about 330,000 objects, 80 MB of JSON and about 0.5 GB of Python dicts. A training process
needs them once: :func:`dataset` parses the file, turns each split's list into a :class:`ShardTable` of numpy
arrays (about 100 bytes a shard) and drops the dicts; the result is cached per process, keyed by the file's path,
size and modification time, so the trainer, its loaders and its evaluation share one copy.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.manifest import MANIFEST, read_manifest


@dataclass(frozen=True)
class ShardTable:
    """One split's shards, column by column."""

    paths: np.ndarray  # bytes (numpy 'S'), relative to the dataset root
    samples: np.ndarray  # int64
    sizes: np.ndarray  # int64, bytes of the tar
    sha256: np.ndarray  # (n, 32) uint8
    index_sha256: np.ndarray | None  # (n, 32) uint8; None for datasets prepared before sample indexes

    @staticmethod
    def of(shards: list[dict]) -> ShardTable:
        def digests(key: str) -> np.ndarray:
            raw = b"".join(bytes.fromhex(s[key]) for s in shards)
            return np.frombuffer(raw, dtype=np.uint8).reshape(len(shards), 32)

        indexed = bool(shards) and all("index_sha256" in s for s in shards)
        return ShardTable(
            paths=np.array([s["path"].encode() for s in shards], dtype=np.bytes_),
            samples=np.array([s["samples"] for s in shards], dtype=np.int64),
            sizes=np.array([s["bytes"] for s in shards], dtype=np.int64),
            sha256=digests("sha256"),
            index_sha256=digests("index_sha256") if indexed else None,
        )

    def __len__(self) -> int:
        return len(self.samples)

    def path(self, i: int) -> str:
        return self.paths[i].decode()

    def nbytes(self) -> int:
        arrays = [self.paths, self.samples, self.sizes, self.sha256, self.index_sha256]
        return sum(a.nbytes for a in arrays if a is not None)


@dataclass(frozen=True)
class Dataset:
    """The manifest without its shard lists (``head``: every other field, as read) and the shard tables."""

    head: dict
    tables: dict[str, ShardTable]


def parse(manifest: dict) -> Dataset:
    """Split a parsed manifest into its head and shard tables (the shard dicts are not kept)."""
    head = {k: v for k, v in manifest.items() if k != "splits"}
    head["splits"], tables = {}, {}
    for name, split in manifest["splits"].items():
        head["splits"][name] = {k: v for k, v in split.items() if k != "shards"}
        head["splits"][name]["shard_count"] = len(split["shards"])
        tables[name] = ShardTable.of(split["shards"])
    return Dataset(head, tables)


def dataset(root: str | Path) -> Dataset:
    """The local dataset at ``root``, parsed once per process (re-read when the manifest file changes)."""
    path = Path(root) / MANIFEST
    try:
        st = os.stat(path)
    except OSError:
        return parse(read_manifest(root))  # read_manifest names the missing manifest
    return _cached(str(Path(root).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached(root: str, size: int, mtime_ns: int) -> Dataset:
    return parse(read_manifest(root))


def parse_bytes(blob: bytes) -> Dataset:
    """A manifest read from elsewhere (a URL or pipe), not cached."""
    return parse(json.loads(blob))
