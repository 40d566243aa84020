"""The streaming, resumable, data-parallel loader over webdataset shards.

Sample order. Epoch ``e`` of a split is one global sequence: shards in an order drawn from ``(seed, e)``, and the
samples of each shard in an order drawn from ``(seed, e, shard)`` (a per-epoch shuffle buffer one shard wide).
Data-parallel rank ``r`` of ``dp`` reads the contiguous slice ``[r*q, (r+1)*q)`` of that sequence, ``q = N // dp``
(the last ``N % dp`` samples of an epoch are dropped, as with ``drop_last``). Each rank therefore reads about
``1/dp`` of the shards. A rank's plan is a list of segments ``(shard, start, end)`` of permuted shards.

Resume. ``state_dict()`` is ``(epoch, pos, segments)``: the plan and how far into it the consumer is. Restoring it
on the same layout replays the identical sequence. :func:`reshard_loader_states` turns the states of ``dp`` ranks
into states for ``dp'`` ranks by concatenating what each rank had left and slicing it anew, so no sample is
repeated or skipped and the global sample count carries over.

Shards are read with webdataset (local paths, URLs, or ``pipe:`` commands with a ``{path}`` placeholder), each
checked against the manifest's sha256 and sample count when first read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.manifest import MANIFEST, read_manifest
from data_pipeline.tarshard import read_token_samples
from data_pipeline.tokenizer import load_tokenizer
from launcher.errors import DataError, IntegrityError

Segment = tuple[int, int, int]  # (shard index, start, end) in the shard's permuted sample order


def _is_remote(root: str) -> bool:
    return root.startswith("pipe:") or "://" in root


def _url(root: str, rel: str) -> str:
    if root.startswith("pipe:"):
        if "{path}" not in root:
            raise DataError(f"loader root '{root}' has no {{path}} placeholder", fix="write pipe:CMD ... {path}")
        return root.replace("{path}", rel)
    return root.rstrip("/") + "/" + rel


def _read_bytes(root: str, rel: str) -> bytes:
    if not _is_remote(root):
        path = Path(root) / rel
        if not path.is_file():
            raise IntegrityError(f"shard '{path}' listed in the manifest is missing", fix="re-run data prepare")
        return path.read_bytes()
    import importlib

    gopen = importlib.import_module("webdataset.gopen").gopen
    try:
        with gopen(_url(root, rel), "rb") as stream:
            return stream.read()
    except Exception as e:  # noqa: BLE001 - any transport failure is reported with the URL
        raise DataError(f"cannot read '{_url(root, rel)}': {e}", fix="check the loader root / URL") from None


def load_dataset_manifest(root: str) -> dict:
    if not _is_remote(root):
        return read_manifest(root)
    return json.loads(_read_bytes(root, MANIFEST))


def check_tokenizer(root: str, tokenizer_file: str | Path) -> None:
    """Fail before training if ``tokenizer_file`` is not the tokenizer the shards were made with."""
    manifest = load_dataset_manifest(root)
    load_tokenizer(tokenizer_file, expected_sha256=manifest["tokenizer"]["sha256"])


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


@dataclass(frozen=True)
class EpochPlan:
    """Where each of ``dp`` ranks reads in one epoch."""

    segments: list[list[Segment]]

    @staticmethod
    def build(counts: list[int], seed: int, epoch: int, dp: int, shuffle: bool) -> EpochPlan:
        order = _rng(seed, epoch).permutation(len(counts)) if shuffle else np.arange(len(counts))
        flat: list[Segment] = [(int(s), 0, counts[s]) for s in order if counts[s] > 0]
        return EpochPlan(_slice(flat, dp))


def _slice(flat: list[Segment], dp: int) -> list[list[Segment]]:
    """Cut a segment list into ``dp`` contiguous runs of equal sample count (remainder dropped)."""
    total = sum(e - s for _, s, e in flat)
    q = total // dp
    out: list[list[Segment]] = [[] for _ in range(dp)]
    rank, need = 0, q
    for shard, start, end in flat:
        while start < end and rank < dp:
            take = min(need, end - start)
            if take:
                out[rank].append((shard, start, start + take))
            start += take
            need -= take
            if need == 0:
                rank, need = rank + 1, q
    return out


def _skip(segments: list[Segment], pos: int) -> list[Segment]:
    """The part of ``segments`` left after consuming ``pos`` samples."""
    out = []
    for shard, start, end in segments:
        n = end - start
        if pos >= n:
            pos -= n
            continue
        out.append((shard, start + pos, end))
        pos = 0
    return out


class ShardReader:
    """Reads one split's shards, verifies them against the manifest and caches the last one in memory."""

    def __init__(self, root: str, split: str, manifest: dict | None = None, verify: bool = True):
        self.root = str(root)
        self.manifest = manifest if manifest is not None else load_dataset_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise DataError(f"dataset '{root}' has no split '{split}'", fix="use train, validation or test")
        self.shards = self.manifest["splits"][split]["shards"]
        self.counts = [s["samples"] for s in self.shards]
        self.verify = verify
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def samples(self, shard: int) -> list[np.ndarray]:
        if self._cache and self._cache[0] == shard:
            return self._cache[1]
        meta = self.shards[shard]
        data = _read_bytes(self.root, meta["path"])
        where = _url(self.root, meta["path"]) if _is_remote(self.root) else str(Path(self.root) / meta["path"])
        if self.verify and hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise IntegrityError(
                f"shard '{where}' does not match the manifest's sha256 (corrupt or truncated)",
                fix="restore the file or re-run `shardforge data prepare`",
            )
        samples = self._parse(data, where)
        if len(samples) != meta["samples"]:
            raise IntegrityError(
                f"shard '{where}' holds {len(samples)} samples, the manifest says {meta['samples']}",
                fix="restore the file or re-run `shardforge data prepare`",
            )
        self._cache = (shard, samples)
        return samples

    @staticmethod
    def _parse(data: bytes, where: str) -> list[np.ndarray]:
        try:
            return read_token_samples(data)
        except Exception as e:  # noqa: BLE001 - tar and numpy raise many types for damaged bytes
            raise IntegrityError(f"shard '{where}' cannot be read as a webdataset tar ({e})") from None


class SampleStream:
    """One data-parallel rank's endless, exactly resumable sample sequence over one split."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        shuffle: bool = True,
        verify: bool = True,
    ):
        assert 0 <= dp_rank < dp_size
        self.reader = ShardReader(str(root), split, verify=verify)
        self.split, self.dp_rank, self.dp_size = split, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        if sum(self.reader.counts) < dp_size:
            raise DataError(
                f"split '{split}' of '{root}' has {sum(self.reader.counts)} samples, fewer than {dp_size} ranks",
                fix="prepare more data or use fewer data-parallel ranks",
            )
        self.epoch, self.pos = 0, 0
        self._custom: list[Segment] | None = None  # a plan set by resharding, valid for self.epoch only

    # --- plan -----------------------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[Segment]:
        if epoch == self.epoch and self._custom is not None:
            return self._custom
        return EpochPlan.build(self.reader.counts, self.seed, epoch, self.dp_size, self.shuffle).segments[self.dp_rank]

    def _order(self, epoch: int, shard: int) -> np.ndarray:
        n = self.reader.counts[shard]
        return _rng(self.seed, epoch, shard, 7).permutation(n) if self.shuffle else np.arange(n)

    # --- iteration --------------------------------------------------------------------------------------
    def iter_from(self, epoch: int, pos: int) -> Iterator[tuple[np.ndarray, int, int]]:
        """Yield ``(tokens, epoch, pos_after)`` forever, starting ``pos`` samples into ``epoch``."""
        while True:
            plan = self.plan(epoch)
            if not plan and not (epoch == self.epoch and self._custom is not None):
                raise DataError(f"split '{self.split}' gives rank {self.dp_rank} no samples per epoch")
            done = pos
            for shard, start, end in _skip(plan, pos):
                samples, order = self.reader.samples(shard), self._order(epoch, shard)
                for i in range(start, end):
                    done += 1
                    yield samples[order[i]], epoch, done
            epoch, pos = epoch + 1, 0

    def samples(self) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        """From the current position: ``(tokens, marker)``; ``advance(marker)`` moves past that sample."""
        for tokens, epoch, pos in self.iter_from(self.epoch, self.pos):
            yield tokens, (epoch, pos)

    def advance(self, marker: tuple[int, int]) -> None:
        epoch, pos = marker
        if epoch != self.epoch:
            self._custom = None
        self.epoch, self.pos = epoch, pos

    # --- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "split": self.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "epoch": self.epoch,
            "pos": self.pos,
            "segments": [list(s) for s in self.plan(self.epoch)],
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise DataError(
                f"loader state is for rank {state['dp_rank']} of {state['dp_size']}, this is rank "
                f"{self.dp_rank} of {self.dp_size}",
                fix="convert the states with reshard_loader_states() first",
            )
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.epoch, self.pos = state["epoch"], state["pos"]
        segs = [tuple(s) for s in state["segments"]]
        self._custom = None
        self._custom = segs if segs != self.plan(self.epoch) else None


def reshard_loader_states(states: list[dict], new_dp: int) -> list[dict]:
    """Give ``new_dp`` ranks what ``len(states)`` ranks had left of the current epoch, no sample twice."""
    epochs = {s["epoch"] for s in states}
    if len(epochs) != 1:
        raise DataError(f"loader states disagree on the epoch ({sorted(epochs)}): they are not from one step")
    states = sorted(states, key=lambda s: s["dp_rank"])
    remaining: list[Segment] = []
    for s in states:
        remaining += _skip([tuple(x) for x in s["segments"]], s["pos"])
    parts = _slice(remaining, new_dp)
    base = {k: states[0][k] for k in ("split", "seed", "shuffle", "epoch")}
    return [
        {**base, "dp_rank": r, "dp_size": new_dp, "pos": 0, "segments": [list(x) for x in parts[r]]}
        for r in range(new_dp)
    ]
