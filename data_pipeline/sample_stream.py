"""Random access into one split's global sample order, over webdataset shards.

Sample order. The samples of a split form one endless global sequence, epoch after epoch. Epoch ``e`` visits the
shards in an order drawn from ``(seed, e)`` and the samples of each shard in an order drawn from
``(seed, e, shard)`` (a shuffle buffer one shard wide, new every epoch). Global position ``g`` is sample
``g mod N`` of epoch ``g // N``; :meth:`SampleStream.read` returns any range of positions without replaying
what came before, so a resume needs nothing but a position.

Local shards are read by sample, through each shard's sample index (byte offsets and CRC-32s, written by
``data prepare``): a rank reads only its own samples and checks each one. Shards without an index, and roots that
are URLs or ``pipe:`` commands with a ``{path}`` placeholder (webdataset's opener), are read whole and checked
against the manifest's sha256 and sample count when first read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from core.errors import DataError, IntegrityError
from data_pipeline.manifest import MANIFEST
from data_pipeline.shard_table import Dataset, dataset, parse_bytes
from data_pipeline.tarshard import (
    INDEX_ROW,
    TarFormatError,
    decode_samples,
    index_path,
    index_rows_start,
    read_index_rows,
    read_token_samples,
    sample_crc_ok,
)
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


def load_dataset(root: str) -> Dataset:
    """The dataset's manifest head and compact shard tables: parsed once per process for a local root."""
    if not _is_remote(root):
        return dataset(root)
    return parse_bytes(_read_bytes(root, MANIFEST))


def load_dataset_manifest(root: str) -> dict:
    """The manifest's fields without the shard lists (those are in :func:`load_dataset`'s tables)."""
    return load_dataset(root).head


def check_tokenizer(root: str, tokenizer_file: str | Path) -> None:
    """Fail before training if ``tokenizer_file`` is not the tokenizer the shards were made with."""
    manifest = load_dataset_manifest(root)
    load_tokenizer(tokenizer_file, expected_sha256=manifest["tokenizer"]["sha256"])


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


class ShardReader:
    """Reads one split's samples. Shards with a sample index (every dataset prepared since the index exists) are
    read by byte range, sample by sample (the index rows too), each sample checked against its CRC-32: a rank
    reads only the samples it trains on (``shardforge data verify`` checks whole files against the manifest).
    Others (older datasets, URL and pipe roots) are read whole, checked against the manifest's sha256, and the
    last one is kept in memory. ``bytes_read`` counts what came from storage."""

    def __init__(self, root: str, split: str, verify: bool = True, indexed: bool = True):
        self.root = str(root)
        tables = load_dataset(self.root).tables
        if split not in tables:
            raise DataError(f"dataset '{root}' has no split '{split}'", fix="use train, validation or test")
        self.table = tables[split]
        self.counts = self.table.samples.tolist()
        self.verify = verify
        self.indexed = indexed and self.table.index_sha256 is not None and not _is_remote(self.root)
        self.bytes_read = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None
        self._indexes: dict[int, tuple[int, int]] = {}
        self._files: dict[int, int] = {}

    def _where(self, shard: int) -> str:
        rel = self.table.path(shard)
        return _url(self.root, rel) if _is_remote(self.root) else str(Path(self.root) / rel)

    def take(self, shard: int, ids) -> list[np.ndarray]:
        """Samples ``ids`` (positions within the shard) of ``shard``, in that order."""
        if not self.indexed:
            samples = self.samples(shard)
            return [samples[j] for j in ids]
        index_fd, rows_start = self._index(shard)
        rows = read_index_rows(index_fd, rows_start, ids).tolist()  # Python ints: no numpy scalar per field
        fd = self._file(shard)
        blobs = [os.pread(fd, size, offset) for offset, size, _ in rows]
        self.bytes_read += len(rows) * INDEX_ROW + sum(len(b) for b in blobs)
        for j, (offset, size, crc), blob in zip(ids, rows, blobs):
            if len(blob) != size or not sample_crc_ok(blob, crc):
                raise IntegrityError(
                    f"shard '{self._where(shard)}': sample {j} (bytes {offset}-{offset + size}) fails its CRC-32 "
                    "(corrupt or truncated)",
                    fix="restore the file or re-run `shardforge data prepare`; `shardforge data verify` checks all",
                )
        return decode_samples(blobs)

    def _index(self, shard: int) -> tuple[int, int]:
        """The open sample index of ``shard`` and where its rows start (its header read, its rows not)."""
        if shard not in self._indexes:
            path = Path(self.root) / index_path(self.table.path(shard))
            fix = "restore it or re-run `shardforge data prepare`"
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                raise IntegrityError(f"sample index '{path}' is missing", fix=fix) from None
            try:
                start, rows = index_rows_start(fd)
            except (TarFormatError, ValueError, KeyError, TypeError):
                os.close(fd)
                raise IntegrityError(f"sample index '{path}' is damaged", fix=fix) from None
            if rows != self.counts[shard]:
                os.close(fd)
                raise IntegrityError(f"sample index '{path}' lists {rows} samples, the manifest {self.counts[shard]}",
                                     fix=fix)  # fmt: skip
            if len(self._indexes) >= 8:
                os.close(self._indexes.pop(next(iter(self._indexes)))[0])
            self._indexes[shard] = (fd, start)
        return self._indexes[shard]

    def _file(self, shard: int) -> int:
        if shard not in self._files:
            path = Path(self._where(shard))
            if not path.is_file():
                raise IntegrityError(f"shard '{path}' listed in the manifest is missing", fix="re-run data prepare")
            if path.stat().st_size != self.table.sizes[shard]:
                raise IntegrityError(f"shard '{path}' holds {path.stat().st_size} bytes, the manifest says "
                                     f"{self.table.sizes[shard]} (truncated or replaced)",
                                     fix="restore the file or re-run `shardforge data prepare`")  # fmt: skip
            if len(self._files) >= 8:
                os.close(self._files.pop(next(iter(self._files))))
            self._files[shard] = os.open(path, os.O_RDONLY)
        return self._files[shard]

    def close(self) -> None:
        for fd in [*self._files.values(), *(fd for fd, _ in self._indexes.values())]:
            os.close(fd)
        self._files.clear()
        self._indexes.clear()

    def __del__(self):
        self.close()

    def samples(self, shard: int) -> list[np.ndarray]:
        """Every sample of ``shard``, read whole and checked against the manifest's sha256."""
        if self._cache and self._cache[0] == shard:
            return self._cache[1]
        data = _read_bytes(self.root, self.table.path(shard))
        self.bytes_read += len(data)
        where = self._where(shard)
        if self.verify and hashlib.sha256(data).digest() != self.table.sha256[shard].tobytes():
            raise IntegrityError(
                f"shard '{where}' does not match the manifest's sha256 (corrupt or truncated)",
                fix="restore the file or re-run `shardforge data prepare`",
            )
        samples = self._parse(data, where)
        if len(samples) != self.counts[shard]:
            raise IntegrityError(
                f"shard '{where}' holds {len(samples)} samples, the manifest says {self.counts[shard]}",
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
        self,
        root: str | Path,
        split: str = "train",
        seed: int = 1234,
        shuffle: bool = True,
        verify: bool = True,
        indexed: bool = True,
    ):
        self.root = str(root)
        self.reader = ShardReader(self.root, split, verify=verify, indexed=indexed)
        self.split, self.seed, self.shuffle = split, seed, shuffle
        self.epoch_size = sum(self.reader.counts)
        if self.epoch_size == 0:
            raise DataError(f"split '{split}' of '{root}' holds no samples", fix="prepare more data")
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None
        self._within_cache: tuple[tuple[int, int], list[int]] | None = None

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, cumulative sample offsets of that order) for ``epoch``."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.reader.counts)
            order = _rng(self.seed, epoch).permutation(n) if self.shuffle else np.arange(n)
            starts = np.concatenate([[0], np.cumsum([self.reader.counts[s] for s in order])])
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _within(self, epoch: int, shard: int) -> np.ndarray:
        """The order of ``shard``'s samples in ``epoch`` (the last one kept: a step reads a few of them)."""
        if self._within_cache is None or self._within_cache[0] != (epoch, shard):
            n = self.reader.counts[shard]
            order = _rng(self.seed, epoch, shard, 7).permutation(n) if self.shuffle else np.arange(n)
            self._within_cache = ((epoch, shard), order.tolist())
        return self._within_cache[1]

    def read(self, start: int, count: int) -> list[np.ndarray]:
        """Samples at global positions ``[start, start + count)``, crossing epochs as needed."""
        out: list[np.ndarray] = []
        pos = start
        while len(out) < count:
            epoch, offset = divmod(pos, self.epoch_size)
            order, starts = self._epoch_order(epoch)
            k = int(np.searchsorted(starts, offset, side="right")) - 1
            shard = int(order[k])
            within = self._within(epoch, shard)
            first = offset - int(starts[k])
            take = min(count - len(out), int(starts[k + 1]) - offset)
            out += self.reader.take(shard, within[first : first + take])
            pos += take
        return out
