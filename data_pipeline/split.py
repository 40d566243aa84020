"""Deterministic train/validation/test assignment by a hash of each document's content.

A document's split depends on its text alone, so adding documents later never moves an existing one, and the
same text lands in the same split on every machine and in every Slurm array task.
"""

from __future__ import annotations

import hashlib
import heapq

SPLIT_NAMES = ("train", "validation", "test")


def content_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def unit_interval(digest: bytes, salt: bytes = b"") -> float:
    """Map a digest (and an optional salt) to a number in [0, 1)."""
    if salt:
        digest = hashlib.sha256(salt + digest).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(digest: bytes, fractions: tuple[float, float, float]) -> str:
    u = unit_interval(digest, b"split")
    edge = 0.0
    for name, frac in zip(SPLIT_NAMES, fractions):
        edge += frac
        if u < edge:
            return name
    return [n for n, f in zip(SPLIT_NAMES, fractions) if f > 0][-1]  # rounding at the top edge


class DigestSet:
    """An order-independent digest of a set of documents: sha256 over their sorted content digests."""

    def __init__(self) -> None:
        self._members: list[bytes] = []

    def add(self, digest: bytes) -> None:
        self._members.append(digest)

    def write(self, path) -> None:
        """One hex digest per line, sorted: which documents a split holds, for audits and comparisons."""
        with open(path, "w", encoding="ascii") as f:
            f.writelines(d.hex() + "\n" for d in sorted(self._members))

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for d in sorted(self._members):
            h.update(d)
        return h.hexdigest()


class MergedDigests:
    """The same interface over files of sorted raw 32-byte digests (one per task), merged as a stream: the
    manifest of a corpus of any size never holds its digest list in memory."""

    def __init__(self, paths) -> None:
        self.paths = list(paths)

    def _sorted(self):
        def read(path):
            with open(path, "rb") as f:
                while chunk := f.read(32 * 65536):
                    yield from (chunk[i : i + 32] for i in range(0, len(chunk), 32))

        return heapq.merge(*(read(p) for p in self.paths))

    def write(self, path) -> None:
        with open(path, "w", encoding="ascii") as f:
            f.writelines(d.hex() + "\n" for d in self._sorted())

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for d in self._sorted():
            h.update(d)
        return h.hexdigest()
