"""Tokenize in worker processes, pack documents into fixed-length samples, write webdataset tar shards.

Packing: each document's tokens followed by EOS, concatenated, cut into samples of ``seq_length + 1`` tokens
(input and shifted target); the incomplete tail of a split is dropped and counted. Workers only tokenize;
packing and writing happen in document order in the parent, so the shards do not depend on the worker count.
Each sample is ``{"__key__": "<split>-<index>", "tokens.npy": uint16/int32 array}``.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.files import sha256_file
from data_pipeline.tarshard import index_path, write_sample_index
from data_pipeline.tokenizer import EOS_ID

_WORKER_SP = None
SHARD_MTIME = 0.0  # fixed tar member time: the same input gives byte-identical shards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def encode_sample(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue()


def _init_worker(model_bytes: bytes) -> None:
    import sentencepiece as spm

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (a rank's flag): terminate() must kill

    global _WORKER_SP
    _WORKER_SP = spm.SentencePieceProcessor(model_proto=model_bytes)


def _encode_batch(texts: list[str]) -> list[np.ndarray]:
    ids = _WORKER_SP.encode(texts, num_threads=1)
    dtype = token_dtype(_WORKER_SP.get_piece_size())  # uint16 halves what travels back to the parent
    return [np.asarray(x, dtype=dtype) for x in ids]


def _batches(texts: Iterable[str], max_chars: int = 1 << 20) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class EncoderPool:
    """Tokenizes a stream of texts in ``num_workers`` processes, yielding token arrays in input order."""

    def __init__(self, model_file: Path, num_workers: int):
        self.model_bytes = Path(model_file).read_bytes()
        self.num_workers = num_workers
        self._pool = None

    def __enter__(self) -> EncoderPool:
        if self.num_workers > 1:
            ctx = mp.get_context("fork")
            self._pool = ctx.Pool(self.num_workers, initializer=_init_worker, initargs=(self.model_bytes,))
        else:
            _init_worker(self.model_bytes)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            if exc[0] is None:
                self._pool.close()  # workers leave on their own; terminate() alone is for errors
            else:
                self._pool.terminate()
            self._pool.join()

    def encode(self, texts: Iterable[str]) -> Iterator[np.ndarray]:
        batches = _batches(texts)
        results = self._pool.imap(_encode_batch, batches) if self._pool else map(_encode_batch, batches)
        for batch in results:
            yield from batch


@dataclass
class ShardInfo:
    path: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    index_sha256: str
    """The sha256 of the shard's sample index (``tarshard.index_path``): byte offsets and CRC-32s of its samples."""


@dataclass
class SplitWriter:
    """Packs one split's token stream into samples and writes them into tar shards under ``out_dir``."""

    out_dir: Path
    split: str
    sample_tokens: int
    dtype: np.dtype
    max_shard_bytes: int
    name_prefix: str = "shard"
    """Shard files are ``<name_prefix>-NNNNNN.tar``; Slurm array tasks use one prefix each."""
    shards: list[ShardInfo] = field(default_factory=list)
    documents: int = 0
    samples: int = 0
    dropped_tail_tokens: int = 0
    _chunks: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0
    _writer: object = None
    _in_shard: int = 0

    def __post_init__(self) -> None:
        import webdataset as wds

        self.out_dir.mkdir(parents=True, exist_ok=True)
        pattern = str(self.out_dir).replace("%", "%%") + f"/{self.name_prefix}-%06d.tar"
        self._writer = wds.ShardWriter(
            pattern, maxsize=self.max_shard_bytes, post=self._shard_done, verbose=0, mtime=SHARD_MTIME
        )

    def _shard_done(self, fname: str) -> None:
        path = Path(fname)
        if self._in_shard == 0:  # ShardWriter opens a file before the first sample arrives
            path.unlink()
            return
        rel = f"{self.split}/{path.name}"
        tokens = self._in_shard * self.sample_tokens
        index = path.parent / Path(index_path(rel)).name
        write_sample_index(path, index)
        info = ShardInfo(rel, self._in_shard, tokens, path.stat().st_size, sha256_file(path), sha256_file(index))
        self.shards.append(info)
        self._in_shard = 0

    def add_document(self, ids: np.ndarray) -> None:
        self.documents += 1
        self._chunks.append(ids)
        self._chunks.append(np.array([EOS_ID], dtype=ids.dtype))
        self._buffered += len(ids) + 1
        if self._buffered >= self.sample_tokens:
            self._flush_full_samples()

    def _flush_full_samples(self) -> None:
        stream = np.concatenate(self._chunks)
        n = len(stream) // self.sample_tokens
        for i in range(n):
            sample = stream[i * self.sample_tokens : (i + 1) * self.sample_tokens].astype(self.dtype, copy=False)
            self._write(sample)
        rest = stream[n * self.sample_tokens :]
        self._chunks, self._buffered = [rest], len(rest)

    def _write(self, sample: np.ndarray) -> None:
        key = (
            f"{self.split}-{self.samples:09d}"
            if self.name_prefix == "shard"
            else f"{self.name_prefix}-{self.samples:09d}"
        )
        self._writer.write({"__key__": key, "tokens.npy": encode_sample(sample)})
        self._in_shard += 1
        self.samples += 1

    def close(self) -> None:
        self.dropped_tail_tokens = self._buffered
        self._chunks, self._buffered = [], 0
        self._writer.close()

    def summary(self) -> dict:
        return {
            "documents": self.documents,
            "samples": self.samples,
            "tokens": self.samples * self.sample_tokens,
            "dropped_tail_tokens": self.dropped_tail_tokens,
            "document_tokens": self.samples * self.sample_tokens + self.dropped_tail_tokens,
            "shards": [vars(s) for s in self.shards],
        }
