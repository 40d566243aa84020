"""The streaming loader: global order, layout-independent steps, exact resume, workers, URLs, blending."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np

from data_pipeline.batch_loader import BatchLoader, BlendedStream
from data_pipeline.manifest import read_manifest
from data_pipeline.sample_stream import SampleStream

GBS, MBS = 12, 2


def key(row) -> str:
    """A sample's identity is its content (torch or numpy row)."""
    arr = row.numpy() if hasattr(row, "numpy") else row
    return hashlib.sha1(np.asarray(arr, dtype=np.int64).tobytes()).hexdigest()


def loaders(root, dp, workers=0, seed=11, split="train"):
    return [BatchLoader(SampleStream(root, split, seed=seed), GBS, MBS, r, dp, workers) for r in range(dp)]


def global_steps(lds, steps):
    """Per step: the multiset of sample keys all ranks saw (rank order kept)."""
    out = []
    for _ in range(steps):
        rows = [key(row) for ld in lds for mb in ld.next_step() for row in mb]
        out.append(rows)
    return out


def epoch_multiset(root, split="train") -> Counter:
    s = SampleStream(root, split, shuffle=False)
    return Counter(key(r) for r in s.read(0, s.epoch_size))


def test_an_epoch_is_a_permutation_and_each_epoch_differs(prepared):
    s = SampleStream(prepared, "train", seed=3)
    n = s.epoch_size
    assert n == read_manifest(prepared)["splits"]["train"]["samples"]
    e0, e1 = [key(r) for r in s.read(0, n)], [key(r) for r in s.read(n, n)]
    assert Counter(e0) == Counter(e1) == epoch_multiset(prepared)
    assert e0 != e1
    assert [key(r) for r in SampleStream(prepared, "train", seed=4).read(0, n)] != e0
    # random access equals sequential reading, across the epoch boundary too
    assert [key(r) for r in s.read(n - 5, 10)] == e0[-5:] + e1[:5]


def test_every_layout_sees_the_same_global_batches(prepared):
    ref = global_steps(loaders(prepared, 1), 8)
    for dp in (2, 3, 6):
        got = global_steps(loaders(prepared, dp), 8)
        assert got == ref, dp  # same samples, same order: rank r holds the r-th slice
    lds = loaders(prepared, 3)
    first = [[key(row) for mb in ld.next_step() for row in mb] for ld in lds]
    assert all(len(f) == GBS // 3 for f in first) and not set(first[0]) & set(first[1])
    assert lds[0].accumulation_steps == GBS // (MBS * 3)


def test_resume_is_exact_on_the_same_and_on_another_layout(prepared):
    n_steps = read_manifest(prepared)["splits"]["train"]["samples"] // GBS + 4  # crosses an epoch
    full = global_steps(loaders(prepared, 2), n_steps)
    first = loaders(prepared, 2)
    global_steps(first, 5)
    state = first[0].state_dict()
    assert all(ld.state_dict() == state for ld in first) and state["position"] == 5 * GBS
    for dp in (2, 1, 3):
        resumed = loaders(prepared, dp)
        for ld in resumed:
            ld.load_state_dict(state)
        assert global_steps(resumed, n_steps - 5) == full[5:], dp
    seen = Counter(k for step in full[: n_steps - 4] for k in step)
    assert not seen - epoch_multiset(prepared)  # within the first epoch nothing repeats


def test_worker_processes_keep_the_order_and_state(prepared):
    with_workers = loaders(prepared, 2, workers=2)
    assert global_steps(with_workers, 9) == global_steps(loaders(prepared, 2), 9)
    assert with_workers[0].state_dict()["position"] == 9 * GBS


def test_a_dropped_loader_stops_its_worker_processes_at_once(prepared):
    """Dropping a loader (the end of a run) or its iterator (loading a state) shuts its workers down then and
    there (joined), not whenever the garbage collector gets to a reference cycle."""
    import psutil

    me = psutil.Process()
    [ld] = loaders(prepared, 1, workers=2)
    ld.next_step()
    assert len(me.children()) == 2
    ld.load_state_dict(ld.state_dict())
    assert me.children() == []
    assert len(ld.next_step()) == ld.accumulation_steps and len(me.children()) == 2  # new workers read on
    del ld
    assert me.children() == []


def test_pipe_urls_stream_the_same_samples(prepared):
    url = f"pipe:cat {prepared}/{{path}}"
    assert global_steps(loaders(url, 1), 4) == global_steps(loaders(prepared, 1), 4)


def test_blend_is_exact_deterministic_and_resumable(prepared):
    def blend(dp=1):
        streams = [SampleStream(prepared, "train", seed=1), SampleStream(prepared, "validation", seed=1)]
        return [BatchLoader(BlendedStream(streams, [3.0, 1.0]), GBS, MBS, r, dp) for r in range(dp)]

    lds = blend()
    full = global_steps(lds, 10)
    assert lds[0].state_dict()["stream"]["drawn"] == [90, 30]
    train = {key(r) for r in SampleStream(prepared, "train", seed=1).read(0, 90)}
    assert sum(k in train for step in full for k in step) == 90
    part = blend()
    global_steps(part, 4)
    state = part[0].state_dict()
    again = blend(dp=2)
    for ld in again:
        ld.load_state_dict(state)
    assert global_steps(again, 6) == full[4:]


class Counting:
    """A stream of known samples (its own position, repeated) that counts what is read from it."""

    def __init__(self, tag: int):
        self.tag, self.reads = tag, 0

    def read(self, start: int, count: int) -> list[np.ndarray]:
        self.reads += count
        return [np.array([self.tag, start + i]) for i in range(count)]


def test_blending_far_into_the_run_walks_each_position_once_and_keeps_the_order():
    """Megatron's rule, written out independently (dataset furthest behind weight * (i + 1) - drawn), for the
    first 10,000 positions; then reading 16 samples per step for 1,000 steps from position 100,000 on walks the
    100,000 positions to get there once and then 16 per step, not 100,000 per step."""
    weights = [0.5, 0.3, 0.2]
    drawn, expected = [0, 0, 0], []
    for i in range(10_000):
        d = max(range(3), key=lambda j: (weights[j] * (i + 1) - drawn[j], -j))
        expected.append((d, drawn[d]))
        drawn[d] += 1
    blend = BlendedStream([Counting(t) for t in range(3)], [5.0, 3.0, 2.0])
    got = [tuple(int(x) for x in sample) for start in range(0, 10_000, 16) for sample in blend.read(start, 16)]
    assert len(got) == len(expected) == 10_000 and got == expected
    far = BlendedStream([Counting(t) for t in range(3)], [5.0, 3.0, 2.0])
    for step in range(1000):
        assert len(far.read(100_000 + 16 * step, 16)) == 16
    assert far.walked == 100_000 + 16 * 1000
    assert far.counts_at(116_000) == [58_000, 34_800, 23_200]
