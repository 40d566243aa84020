"""Global batches for data-parallel training: blending, slicing by rank, worker processes, resumable state.

Step ``k`` consumes the global positions ``[p, p + G)`` of the stream (``G`` = global batch size); data-parallel
rank ``r`` of ``dp`` takes the slice ``[p + r*G/dp, p + (r+1)*G/dp)`` and splits it into micro-batches. So every
optimizer step sees the same samples whatever the layout, and the whole resumable state is the position ``p``
(plus, when blending, how many samples each dataset has given): resuming on another data-parallel size continues
from the same global sample with nothing repeated or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from core.errors import ConfigError, DataError


class BlendedStream:
    """Mixes streams by weight, deterministically: sample ``i`` comes from the dataset furthest behind its share
    (``weight * (i + 1) - drawn``), as Megatron's blended dataset does. Positions are blended positions.

    The walk that assigns positions to datasets starts at an anchor (a position and the counts drawn before it)
    that moves forward with every read, so reading forward costs O(samples read), whatever the position;
    ``walked`` counts the positions walked."""

    def __init__(self, streams: list, weights: list[float]):
        if not streams or len(streams) != len(weights):
            raise DataError("loader.blend needs one weight per dataset")
        total = float(sum(weights))
        self.streams, self.weights = streams, np.array([w / total for w in weights])
        self._anchor = (0, [0] * len(streams))  # (position, samples drawn from each dataset before it)
        self.walked = 0

    def _walk(self, start: int, count: int) -> list[tuple[int, int]]:
        """Which (dataset, dataset position) serve blended positions [start, start+count); the anchor moves to
        the end of the range."""
        pos, drawn = self._anchor
        if start < pos:
            raise DataError(f"blended stream cannot go back from position {pos} to {start}")
        drawn, weights, order = list(drawn), self.weights.tolist(), range(len(self.streams))
        picks = []
        for i in range(pos, start + count):
            d = max(order, key=lambda j: weights[j] * (i + 1) - drawn[j])  # the first of equals, as argmax
            if i >= start:
                picks.append((d, drawn[d]))
            drawn[d] += 1
        self.walked += start + count - pos
        self._anchor = (start + count, drawn)
        return picks

    def counts_at(self, position: int) -> list[int]:
        self._walk(position, 0)
        return list(self._anchor[1])

    def read(self, start: int, count: int) -> list[np.ndarray]:
        return [self.streams[d].read(p, 1)[0] for d, p in self._walk(start, count)]

    def state_at(self, position: int) -> dict:
        return {"drawn": self.counts_at(position)}

    def load_state_at(self, position: int, state: dict) -> None:
        self._anchor = (position, list(state["drawn"]))


class TokensNotRead:
    """The stream of a rank that never looks at tokens (a pipeline stage neither first nor last): zeros of the
    sample's length, no reads. The wrapped stream's state (a blend's counts) is still there to save and load."""

    def __init__(self, stream, sample_tokens: int):
        self.stream, self.zeros = stream, np.zeros(sample_tokens, dtype=np.int32)

    def read(self, start: int, count: int) -> list[np.ndarray]:
        return [self.zeros] * count

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _rank_step(stream, position: int, gbs: int, mbs: int, dp_rank: int, dp: int) -> list[torch.Tensor]:
    per_rank = gbs // dp
    rows = stream.read(position + dp_rank * per_rank, per_rank)
    arr = torch.from_numpy(np.stack(rows).astype(np.int64))
    return list(arr.split(mbs))


class _StepsInWorkers(torch.utils.data.IterableDataset):
    """Worker ``w`` of ``W`` builds steps ``w, w+W, ...``; DataLoader's round-robin keeps the order. It holds the
    stream and the batch shape, not the BatchLoader: no reference cycle, so dropping the loader's iterator shuts
    the workers down at once (a cycle left it to the garbage collector, whose shutdown waited 5 s per worker)."""

    def __init__(self, stream, start: int, gbs: int, mbs: int, dp_rank: int, dp: int):
        self.stream, self.start, self.shape = stream, start, (gbs, mbs, dp_rank, dp)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        gbs = self.shape[0]
        k = wid
        while True:
            yield _rank_step(self.stream, self.start + k * gbs, *self.shape)
            k += nw


class BatchLoader:
    """This rank's micro-batches, step by step: ``next_step()`` -> list of LongTensor (mbs, seq_length + 1)."""

    def __init__(
        self,
        stream,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp: int = 1,
        num_workers: int = 0,
        prefetch: bool = False,
    ):
        if global_batch_size % (micro_batch_size * dp):
            raise ConfigError(
                f"global batch {global_batch_size} is not a multiple of micro batch {micro_batch_size} x dp {dp}"
            )
        self.stream, self.gbs, self.mbs = stream, global_batch_size, micro_batch_size
        self.dp_rank, self.dp, self.num_workers = dp_rank, dp, num_workers
        self.position = 0
        self._it: Iterator | None = None
        self.prefetch = prefetch and num_workers == 0
        self._pending = None  # the next step's samples, being read by the prefetch thread
        self._pool = None
        self._state: dict | None = None  # the stream's state at ``position``, taken before a prefetch moves it

    @property
    def accumulation_steps(self) -> int:
        return self.gbs // (self.mbs * self.dp)

    def next_step(self) -> list[torch.Tensor]:
        if self.prefetch:
            return self._next_prefetched()
        if self.num_workers == 0:
            step = _rank_step(self.stream, self.position, self.gbs, self.mbs, self.dp_rank, self.dp)
        else:
            if self._it is None:
                self._it = iter(
                    torch.utils.data.DataLoader(
                        _StepsInWorkers(self.stream, self.position, self.gbs, self.mbs, self.dp_rank, self.dp),
                        batch_size=None,
                        num_workers=self.num_workers,
                        multiprocessing_context="fork",
                    )
                )
            step = next(self._it)
        self.position += self.gbs
        return step

    def _next_prefetched(self) -> list[torch.Tensor]:
        """This step from the prefetch thread (read now if none is pending), then start reading the next one. The
        stream's state at the new position is taken first, so saving it never races the thread."""
        from concurrent.futures import ThreadPoolExecutor

        shape = (self.gbs, self.mbs, self.dp_rank, self.dp)
        if self._pending is None:
            step = _rank_step(self.stream, self.position, *shape)
        else:
            step, self._pending = self._pending.result(), None
        self.position += self.gbs
        self._state = self.stream.state_at(self.position) if hasattr(self.stream, "state_at") else None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending = self._pool.submit(_rank_step, self.stream, self.position, *shape)
        return step

    def _drop_prefetch(self) -> None:
        if self._pending is not None:
            self._pending.cancel() or self._pending.exception()  # wait for a running read; its error is moot
            self._pending = None

    def state_dict(self) -> dict:
        """Layout-independent: the global position, and the blend counts there."""
        state = {"position": self.position, "global_batch_size": self.gbs}
        if hasattr(self.stream, "state_at"):
            state["stream"] = self._state if self._pending is not None else self.stream.state_at(self.position)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._drop_prefetch()
        self.position = int(state["position"])
        if "stream" in state and hasattr(self.stream, "load_state_at"):
            self.stream.load_state_at(self.position, state["stream"])
        self._it = None  # restart reading (and any workers) from the restored position
