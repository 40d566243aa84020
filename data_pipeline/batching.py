"""Micro-batches for training: blending several datasets, batching, optional worker processes.

A *stream* (``SampleStream`` or ``BlendedStream``) yields ``(tokens, marker)`` pairs and moves its resumable
position with ``advance(marker)``. ``BatchLoader`` advances the stream only when it hands a batch to the
trainer, so ``state_dict()`` always describes what the trainer has consumed, however far workers read ahead.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from launcher.errors import DataError


class BlendedStream:
    """Mixes streams with weights, deterministically: the next sample comes from the stream furthest behind
    its share (``weight * (n + 1) - drawn``), as Megatron's blended dataset does."""

    def __init__(self, streams: list, weights: list[float]):
        if not streams or len(streams) != len(weights):
            raise DataError("loader.blend needs one weight per dataset")
        total = float(sum(weights))
        self.streams, self.weights = streams, [w / total for w in weights]
        self.drawn = [0] * len(streams)

    def _pick(self, drawn: list[int]) -> int:
        n = sum(drawn)
        return int(np.argmax([w * (n + 1) - d for w, d in zip(self.weights, drawn)]))

    def samples(self) -> Iterator[tuple[np.ndarray, tuple]]:
        iters = [s.samples() for s in self.streams]
        drawn = list(self.drawn)
        markers: list = [None] * len(self.streams)
        while True:
            i = self._pick(drawn)
            tokens, markers[i] = next(iters[i])
            drawn[i] += 1
            yield tokens, (tuple(drawn), tuple(markers))

    def advance(self, marker: tuple) -> None:
        drawn, markers = marker
        for stream, m in zip(self.streams, markers):
            if m is not None:
                stream.advance(m)
        self.drawn = list(drawn)

    def state_dict(self) -> dict:
        return {"drawn": list(self.drawn), "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = list(state["drawn"])
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)


class _WorkerBatches(torch.utils.data.IterableDataset):
    """Worker ``w`` of ``W`` collates batches ``w, w+W, ...``; DataLoader's round-robin restores the order."""

    def __init__(self, stream, micro_batch_size: int):
        self.stream, self.mbs = stream, micro_batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        yield from _batches(self.stream, self.mbs, lambda b: b % nw == wid)


def _batches(stream, mbs: int, mine=lambda b: True) -> Iterator[dict]:
    it = stream.samples()
    b = 0
    while True:
        chunk = [next(it) for _ in range(mbs)]
        if mine(b):
            tokens = torch.from_numpy(np.stack([t for t, _ in chunk]).astype(np.int64))
            yield {"tokens": tokens, "marker": chunk[-1][1]}
        b += 1


class BatchLoader:
    """Endless micro-batches ``{"tokens": LongTensor (B, seq_length + 1)}`` with an exact resumable state."""

    def __init__(self, stream, micro_batch_size: int, num_workers: int = 0):
        self.stream, self.mbs, self.num_workers = stream, micro_batch_size, num_workers
        self.consumed_batches = 0
        self._it: Iterator[dict] | None = None

    def _start(self) -> Iterator[dict]:
        if self.num_workers == 0:
            return _batches(self.stream, self.mbs)
        loader = torch.utils.data.DataLoader(
            _WorkerBatches(self.stream, self.mbs),
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            multiprocessing_context="fork",
        )
        return iter(loader)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        self.stream.advance(batch["marker"])
        self.consumed_batches += 1
        return batch["tokens"]

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "consumed_batches": self.consumed_batches}

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state["stream"])
        self.consumed_batches = state["consumed_batches"]
        self._it = None  # restart reading from the restored position
