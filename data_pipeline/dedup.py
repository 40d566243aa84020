"""Corpus-wide exact and near deduplication split over tasks: no task holds all digests or all signatures.

The rule (the same for one machine and for any number of Slurm tasks, because it depends only on the global
document order):

- **exact**: of the documents with the same content (sha256 of the cleaned text, 128 bits kept), the first one in
  input order stays;
- **near**: MinHash signatures (datasketch, word n-grams) are cut into ``b`` bands of ``r`` values (the banding
  datasketch's ``MinHashLSH`` picks for ``data.minhash_threshold``); a document that shares a band with an earlier
  document is dropped. The kept documents therefore contain no pair that shares a band, and the first document of
  every group stays. This is a superset of what streaming LSH drops (which only compares with kept documents).

How it is split: each *map* task writes one record per document and key (the content digest, and one band hash per
band) into a file sorted by partition (``key1 % partitions``), then key; *dedup* task ``k`` reads partition ``k``
of every map task's file (a byte range), sorts it, and writes the ids of the documents to drop, sorted by id; each
map task then reads its own ids from every dedup task's file (a binary search). Document ids are
``task << 40 | index``, so sorting by id is the global input order. This module owns the record and removal files.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.config import DataConfig

RECORD = np.dtype([("part", "<u4"), ("kind", "<u2"), ("key1", "<u8"), ("key2", "<u8"), ("id", "<u8"),
                   ("held", "u1")])  # fmt: skip
"""One record: ``kind`` 0 = content digest (key1, key2 = its first 16 bytes), ``kind`` 1+i = band i's hash."""
REMOVAL = np.dtype([("id", "<u8"), ("reason", "u1")])
EXACT, HELD_OUT, NEAR = 1, 2, 3
"""Reasons, in precedence: an exact copy, a copy of a held-out (validation/test input) document, a near copy."""
TASK_SHIFT = 40


def doc_id(task: int, index: int) -> int:
    return (task << TASK_SHIFT) | index


@lru_cache(maxsize=8)
def banding(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band): datasketch's choice for this threshold, so recall matches its LSH."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


class RecordWriter:
    """Collects one task's records; :meth:`save` writes them sorted by partition and returns per-partition counts."""

    def __init__(self, cfg: DataConfig, task: int, partitions: int):
        self.cfg, self.task, self.partitions = cfg, task, partitions
        self.bands, self.rows = banding(cfg.minhash_threshold, cfg.minhash_num_perm)
        self._chunks: list[np.ndarray] = []
        self._pending: list[tuple] = []
        self._count = 0

    def add(self, digest: bytes, hashvalues: np.ndarray | None, held: bool) -> int:
        """Records for the next document (its content digest; its MinHash values unless near-dedup is off)."""
        ident = doc_id(self.task, self._count)
        self._count += 1
        keys = [(0, int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little"))]
        if hashvalues is not None:
            raw = np.asarray(hashvalues, dtype="<u8").tobytes()
            step = 8 * self.rows
            for b in range(self.bands):
                h = hashlib.blake2b(raw[b * step : (b + 1) * step], digest_size=8).digest()
                keys.append((1 + b, int.from_bytes(h, "little"), 0))
        self._pending.extend((k1 % self.partitions, kind, k1, k2, ident, held) for kind, k1, k2 in keys)
        if len(self._pending) >= 65536:  # tuples cost ~10x a record: keep them few
            self._chunks.append(np.array(self._pending, RECORD))
            self._pending = []
        return ident

    def array(self) -> np.ndarray:
        """All records, sorted by partition, then key, then document."""
        rec = np.concatenate([*self._chunks, np.array(self._pending, RECORD)])
        return rec[np.lexsort((rec["id"], rec["key2"], rec["key1"], rec["kind"], rec["part"]))]

    def save(self, path: Path) -> list[int]:
        """Write the records; the count of each partition's (its byte range in the file)."""
        rec = self.array()
        np.save(path, rec)
        return np.bincount(rec["part"], minlength=self.partitions).tolist()


def read_partition(path: Path, counts: list[int], part: int) -> np.ndarray:
    """Partition ``part`` of one map task's record file: only its byte range is read."""
    lo = sum(counts[:part])
    return np.array(np.load(path, mmap_mode="r")[lo : lo + counts[part]])


def find_removals(records: np.ndarray, dedup_exact: bool, dedup_near: bool) -> np.ndarray:
    """The documents to drop among one partition's records (all map tasks'), as REMOVAL rows sorted by id."""
    if len(records) == 0:
        return np.zeros(0, REMOVAL)
    rec = records[np.lexsort((records["id"], records["key2"], records["key1"], records["kind"]))]
    same = np.zeros(len(rec), bool)  # same key as the record before: not the first of its group
    same[1:] = (
        (rec["kind"][1:] == rec["kind"][:-1])
        & (rec["key1"][1:] == rec["key1"][:-1])
        & (rec["key2"][1:] == rec["key2"][:-1])
    )
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(rec))))  # index of each group's first record
    exact = same & (rec["kind"] == 0)
    held = exact & (rec["held"][first] == 1) & (rec["held"] == 0)
    near = same & (rec["kind"] > 0)
    reason = np.zeros(len(rec), "u1")
    if dedup_near:
        reason[near] = NEAR
    reason[held] = HELD_OUT
    if dedup_exact:
        reason[exact] = EXACT
    out = np.zeros(int((reason > 0).sum()), REMOVAL)
    out["id"], out["reason"] = rec["id"][reason > 0], reason[reason > 0]
    out = out[np.lexsort((out["reason"], out["id"]))]
    keep = np.ones(len(out), bool)
    keep[1:] = out["id"][1:] != out["id"][:-1]  # one row per document: the reason of highest precedence
    return out[keep]


def removals_for_task(sources: list, task: int) -> dict[int, int]:
    """Document index -> reason for map task ``task``, from every dedup task's removals (files or arrays)."""
    lo, hi = doc_id(task, 0), doc_id(task + 1, 0)
    out: dict[int, int] = {}
    for src in sources:
        rem = src if isinstance(src, np.ndarray) else np.load(src, mmap_mode="r")
        a, b = np.searchsorted(rem["id"], [lo, hi])
        for ident, reason in zip(rem["id"][a:b].tolist(), rem["reason"][a:b].tolist()):
            index = ident - lo
            out[index] = min(reason, out.get(index, 255))
    return out
