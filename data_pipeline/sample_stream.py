"""Random access into one split's global sample order, over webdataset shards.

Sample order. The samples of a split form one endless global sequence, epoch after epoch. Epoch ``e`` visits the
shards in an order drawn from ``(seed, e)`` and the samples of each shard in an order drawn from
``(seed, e, shard)`` (a shuffle buffer one shard wide, new every epoch). Global position ``g`` is sample
``g mod N`` of epoch ``g // N``; :meth:`SampleStream.read` returns any range of positions without replaying
what came before, so a resume needs nothing but a position.

Shards are read with webdataset's opener (local paths, URLs, or ``pipe:`` commands with a ``{path}``
placeholder), each checked against the manifest's sha256 and sample count when first read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from core.errors import DataError, IntegrityError
from data_pipeline.manifest import MANIFEST, read_manifest
from data_pipeline.tarshard import read_token_samples
from data_pipeline.tokenizer import load_tokenizer


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
    """The global, endless, shuffled sample sequence of one split; random access by position."""

    def __init__(
        self, root: str | Path, split: str = "train", seed: int = 1234, shuffle: bool = True, verify: bool = True
    ):
        self.root = str(root)
        self.reader = ShardReader(self.root, split, verify=verify)
        self.split, self.seed, self.shuffle = split, seed, shuffle
        self.epoch_size = sum(self.reader.counts)
        if self.epoch_size == 0:
            raise DataError(f"split '{split}' of '{root}' holds no samples", fix="prepare more data")
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sample offsets of that order) for ``epoch``."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.reader.counts)
            order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
            starts = np.concatenate([[0], np.cumsum([self.reader.counts[s] for s in order])])
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _within(self, epoch: int, shard: int) -> np.ndarray:
        n = self.reader.counts[shard]
        return _rng(self.seed, epoch, shard, 7).permutation(n) if self.shuffle else np.arange(n)

    def read(self, start: int, count: int) -> list[np.ndarray]:
        """Samples at global positions ``[start, start + count)``, crossing epochs as needed."""
        out: list[np.ndarray] = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.epoch_size)
            order, starts = self._epoch_order(epoch)
            k = int(np.searchsorted(starts, offset, side="right")) - 1
            shard = int(order[k])
            samples, within = self.reader.samples(shard), self._within(epoch, shard)
            first = offset - int(starts[k])
            take = min(count - len(out), int(starts[k + 1]) - offset)
            out += [samples[j] for j in within[first : first + take]]
            pos += take
        return out
