"""The streaming loader: global order, layout-independent steps, exact resume, workers, URLs, blending."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

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


@pytest.mark.parametrize("prefetch", [False, True])
def test_blend_is_exact_deterministic_and_resumable(prepared, prefetch):
    """The same steps and states with the next step read ahead in a thread (the state saved is the position's,
    not the read-ahead's)."""

    def blend(dp=1):
        def streams():
            return [SampleStream(prepared, "train", seed=1), SampleStream(prepared, "validation", seed=1)]

        return [BatchLoader(BlendedStream(streams(), [3.0, 1.0]), GBS, MBS, r, dp, prefetch=prefetch)
                for r in range(dp)]  # fmt: skip

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


def test_each_rank_reads_only_its_own_samples_by_byte_range(prepared):
    """With the sample index a rank's reads are its G/dp samples' payloads and index rows: at dp=4 a step
    costs a quarter of the samples, far below the whole shards the baseline path reads (payload size from tarfile,
    not from the code under test)."""
    import tarfile

    manifest = read_manifest(prepared)
    shards = manifest["splits"]["train"]["shards"]
    with tarfile.open(prepared / shards[0]["path"]) as tar:
        payload = next(m.size for m in tar.getmembers() if m.name.endswith(".tokens.npy"))
    steps, gbs, dp = 6, 16, 4
    index_bytes = 24 * steps * gbs // dp  # one 24-byte index row (offset, size, CRC-32 as int64) per sample
    for rank in range(dp):
        stream = SampleStream(prepared, "train", seed=5)
        loader = BatchLoader(stream, gbs, 2, rank, dp)
        rows = [row for _ in range(steps) for mb in loader.next_step() for row in mb]
        ideal = steps * gbs // dp * payload
        assert len(rows) == steps * gbs // dp
        assert stream.reader.bytes_read == ideal + index_bytes, rank
    whole = SampleStream(prepared, "train", seed=5, indexed=False)
    BatchLoader(whole, gbs, 2, 0, dp).next_step()
    assert whole.reader.bytes_read >= min(s["bytes"] for s in shards) > 20 * ideal / steps


def test_a_flipped_byte_in_a_shard_stops_training_naming_it(prepared, tmp_path):
    """One byte flipped in the sample the first step reads: training stops with exit code 3 and one line naming the
    shard and the sample, before any step."""
    import os
    import shutil
    import subprocess
    import tarfile

    from conftest import REPO, TRAIN_ENV, train_command

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    first = SampleStream(data, "train", seed=1234).read(0, 1)[0]  # loader.seed's default
    reader = SampleStream(data, "train").reader
    shard, j = next((i, j) for i in range(len(reader.counts)) for j, s in enumerate(reader.samples(i))
                    if np.array_equal(s, first))  # fmt: skip
    rel = read_manifest(data)["splits"]["train"]["shards"][shard]["path"]
    with tarfile.open(data / rel) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".tokens.npy")][j]
    with open(data / rel, "r+b") as f:  # the last byte of the sample's token data
        f.seek(member.offset_data + member.size - 1)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    cmd = train_command(tmp_path / "run", data, "train.max_steps=2")
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, **TRAIN_ENV}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "CRC-32" in line]
    assert len(errors) == 1 and str(data / rel) in errors[0] and f"sample {j} " in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "train_result.json").exists()


def test_the_manifest_is_parsed_once_per_process_into_compact_tables(prepared, tmp_path):
    """Every loader of a process shares one parse; the shard lists become arrays equal to the JSON's values; a
    changed manifest is parsed again."""
    import json
    import shutil

    from data_pipeline.sample_stream import load_dataset, load_dataset_manifest

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    first = load_dataset(str(data))
    assert load_dataset(str(data)) is first
    assert SampleStream(data, "validation").reader.table is first.tables["validation"]
    raw = json.loads((data / "manifest.json").read_text())
    for split, table in first.tables.items():
        shards = raw["splits"][split]["shards"]
        assert [table.path(i) for i in range(len(table))] == [s["path"] for s in shards]
        assert table.samples.tolist() == [s["samples"] for s in shards]
        assert [bytes(d).hex() for d in table.sha256] == [s["sha256"] for s in shards]
        assert "shards" not in load_dataset_manifest(str(data))["splits"][split]
    raw["note"] = "changed"
    (data / "manifest.json").write_text(json.dumps(raw))
    assert load_dataset(str(data)) is not first and load_dataset_manifest(str(data))["note"] == "changed"


def test_a_stage_that_uses_no_tokens_reads_none_and_keeps_the_blend_state(prepared):
    """Pipeline stages between the first and the last get zero samples of the right shape and read nothing; their
    loader state (a blend's counts) is the reading loader's."""
    from data_pipeline.batch_loader import TokensNotRead

    def blend():
        return BlendedStream([SampleStream(prepared, "train", seed=1), SampleStream(prepared, "validation")], [2, 1])

    idle_stream = blend()
    idle, reading = BatchLoader(TokensNotRead(idle_stream, 65), GBS, MBS, 1, 2), BatchLoader(blend(), GBS, MBS, 1, 2)
    for _ in range(3):
        got, want = idle.next_step(), reading.next_step()
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want] == [(MBS, 65)] * 3
        assert all(int(t.abs().sum()) == 0 for t in got)
    assert sum(s.reader.bytes_read for s in idle_stream.streams) == 0
    assert idle.state_dict() == reading.state_dict() and idle.state_dict()["stream"]["drawn"] == [24, 12]
