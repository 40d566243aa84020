"""The loader at scale, each figure beside today's baseline measured in the same run:

- bytes read per data-parallel rank per step at DP = 1, 2, 4, 8: by sample byte ranges (the sample index) beside
  whole-shard reads (the path datasets without an index still take), and the ideal ``G/dp x sample bytes``;
  cross-checked for one rank with strace (the bytes its read/pread64 calls returned);
- time to read one step of a 3-source blend at steps 100, 10,000 and 100,000 after a resume, beside the walk
  from position 0 that every read made before the anchor moved with the reads;
- memory of a parsed manifest of a synthetic 330,000-shard dataset: the compact shard tables kept per process
  beside the parsed JSON dicts that were kept (three or four times) before;
- loader tokens/s of one rank beside a raw ``pread`` of the same byte ranges.

Usage: python bench/bench_loader_scale.py. Writes bench/results/loader_scale.json.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.common import shardforge, write_result  # noqa: E402

G, MBS, STEPS = 64, 8, 40


def prepare(tmp: Path) -> Path:
    out = tmp / "data"
    sizes = ["data.seq_length=128", "data.shard_size_mb=1", "data.max_documents=700", "data.dedup_near=false"]
    shardforge("data", "prepare", "-c", "configs/tiny.yaml", f"run_dir={tmp}", f"data.output_dir={out}", *sizes)
    return out


def bytes_per_step(root: Path, dp: int, rank: int, indexed: bool) -> float:
    from data_pipeline.batch_loader import BatchLoader
    from data_pipeline.sample_stream import SampleStream

    stream = SampleStream(root, "train", seed=1, indexed=indexed)
    loader = BatchLoader(stream, G, MBS, rank, dp)
    for _ in range(STEPS):
        loader.next_step()
    return stream.reader.bytes_read / STEPS


def index_rows(path: Path) -> np.ndarray:
    from data_pipeline.tarshard import index_rows_start, read_index_rows

    fd = os.open(path, os.O_RDONLY)
    try:
        start, n = index_rows_start(fd)
        return read_index_rows(fd, start, range(n))
    finally:
        os.close(fd)


def sample_bytes(root: Path) -> float:
    from data_pipeline.sample_stream import load_dataset
    from data_pipeline.tarshard import index_path

    table = load_dataset(str(root)).tables["train"]
    return float(index_rows(root / index_path(table.path(0)))[:, 1].mean())


def strace_bytes(root: Path, dp: int, rank: int) -> int:
    """Bytes returned by read/pread64 on the shard and index files while one rank reads STEPS steps."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from bench.bench_loader_scale import bytes_per_step; "
            f"bytes_per_step(__import__('pathlib').Path({str(root)!r}), {dp}, {rank}, True)")  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        subprocess.run(["strace", "-f", "-e", "trace=openat,read,pread64", "-o", log.name, sys.executable, "-c", code],
                       check=True, capture_output=True)  # fmt: skip
        fds, total = {}, 0
        for line in Path(log.name).read_text().splitlines():
            parts = line.split(None, 1)
            if len(parts) < 2:
                continue
            call = parts[1]
            if call.startswith("openat(") and ("/train/" in call) and "= " in call:
                fd = call.rsplit("= ", 1)[1].split()[0]
                if fd.isdigit():
                    fds[fd] = True
            elif call.startswith(("read(", "pread64(")) and "= " in call:
                fd = call.split("(", 1)[1].split(",", 1)[0]
                n = call.rsplit("= ", 1)[1].split()[0]
                if fd in fds and n.isdigit():
                    total += int(n)
            elif call.startswith("close("):
                fds.pop(call[6:].split(")", 1)[0], None)
        return total


def blend_step_seconds(root: Path, step: int, old_walk: bool) -> float:
    from data_pipeline.batch_loader import BlendedStream
    from data_pipeline.sample_stream import SampleStream

    def blend():
        return BlendedStream([SampleStream(root, "train", seed=s) for s in (1, 2, 3)], [0.5, 0.3, 0.2])

    position = step * 16
    state = blend().state_at(position)  # what a checkpoint holds
    stream = blend()
    stream.load_state_at(position, state)
    stream.read(position, 16)  # open the shards (not timed)
    times = []
    for k in range(1, 6):
        if old_walk:
            stream.load_state_at(0, {"drawn": [0, 0, 0]})  # the anchor stayed at the last save: a walk from 0
        t0 = time.perf_counter()
        stream.read(position + 16 * k, 16)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def manifest_memory(tmp: Path, shards: int = 330_000) -> dict:
    """RSS kept by a parsed manifest, measured in a fresh process for each way."""
    import hashlib

    root = tmp / "big"
    root.mkdir()
    h = hashlib.sha256(b"x").hexdigest()
    split = [{"path": f"train/shard-{i:06d}.tar", "samples": 4000, "tokens": 516000, "bytes": 15_000_000,
              "sha256": h, "index_sha256": h} for i in range(shards)]  # fmt: skip
    manifest = {"format": "shardforge-shards/1", "splits": {"train": {"shards": split, "samples": 4000 * shards}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    code = """
import gc, json, os, sys, psutil
sys.path.insert(0, {repo!r})
from data_pipeline.shard_table import dataset
gc.collect(); before = psutil.Process().memory_info().rss
if sys.argv[1] == "compact":
    kept = dataset({root!r})
else:
    kept = json.loads(open({root!r} + "/manifest.json").read())
gc.collect(); print(psutil.Process().memory_info().rss - before)
""".format(repo=str(REPO), root=str(root))
    out = {}
    for way in ("compact", "dicts"):
        r = subprocess.run([sys.executable, "-c", code, way], check=True, capture_output=True, text=True)
        out[way] = int(r.stdout.split()[-1])
    return {
        "shards": shards,
        "manifest_json_mb": round((root / "manifest.json").stat().st_size / 1e6, 1),
        "compact_tables_mb_per_process": round(out["compact"] / 1e6, 1),
        "baseline_parsed_dicts_mb_per_parse": round(out["dicts"] / 1e6, 1),
        "baseline_parses_per_process": "3-4 (the trainer, each loader, the tokenizer check)",
    }


def sample_ranges(root: Path) -> list[tuple[Path, int, int]]:
    """Every train sample's (shard file, payload offset, size), shard by shard, from the sample indexes."""
    from data_pipeline.sample_stream import load_dataset
    from data_pipeline.tarshard import index_path

    table, out = load_dataset(str(root)).tables["train"], []
    for i in range(len(table)):
        rows = index_rows(root / index_path(table.path(i)))
        out += [(root / table.path(i), int(o), int(n)) for o, n, _ in rows]
    return out


def throughput(root: Path, dp: int = 4) -> dict:
    """One rank's loader tokens/s beside pread of the same byte ranges (page cache warm for both)."""
    from data_pipeline.batch_loader import BatchLoader
    from data_pipeline.sample_stream import SampleStream

    stream, fds = SampleStream(root, "train", seed=1), {}
    loader = BatchLoader(stream, G, MBS, 0, dp)
    t0 = time.perf_counter()
    tokens = sum(t.numel() for _ in range(STEPS * 4) for t in loader.next_step())
    loader_s = time.perf_counter() - t0
    n = STEPS * 4 * G // dp  # samples the loader read; now the same number of byte ranges, raw
    ranges = sample_ranges(root)
    t0 = time.perf_counter()
    for path, o, size in ranges[:n]:
        fd = os.open(path, os.O_RDONLY) if path not in fds else fds[path]
        fds[path] = fd
        os.pread(fd, size, o)
    raw_s = time.perf_counter() - t0
    per_sample = tokens / n
    return {
        "loader_tokens_per_s": round(tokens / loader_s),
        "raw_pread_tokens_per_s": round(n * per_sample / raw_s),
        "loader_vs_raw": round((tokens / loader_s) / (n * per_sample / raw_s), 3),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = prepare(tmp)
        ideal_unit = sample_bytes(root)
        per_dp = {}
        for dp in (1, 2, 4, 8):
            new = max(bytes_per_step(root, dp, r, True) for r in range(dp))
            old = max(bytes_per_step(root, dp, r, False) for r in range(dp))
            ideal = G / dp * ideal_unit
            per_dp[f"dp{dp}"] = {"max_bytes_per_rank_step": round(new), "baseline_whole_shards": round(old),
                                 "ideal": round(ideal), "vs_ideal": round(new / ideal, 3)}  # fmt: skip
        strace = strace_bytes(root, 8, 0) / STEPS
        blend = {}
        for step in (100, 10_000, 100_000):
            new, old = blend_step_seconds(root, step, False), blend_step_seconds(root, step, True)
            blend[f"step_{step}"] = {"read_s": round(new, 5), "baseline_walk_from_0_s": round(old, 5)}
        gc.collect()
        write_result(
            "loader_scale",
            {
                "global_batch": G,
                "sample_payload_bytes": round(ideal_unit, 1),
                "bytes_per_rank_step": per_dp,
                "strace_dp8_rank0_bytes_per_step": round(strace),
                "blend_16_samples": blend,
                "manifest": manifest_memory(tmp),
                "throughput_dp4_rank0": throughput(root),
                "notes": "bytes per step include the 24-byte sample-index rows; the baseline is the whole-shard "
                "path (read, sha256, parse) that datasets without an index take",
            },
        )


if __name__ == "__main__":
    main()
