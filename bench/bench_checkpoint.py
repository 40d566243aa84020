"""Checkpoint save and load throughput (MB/s) beside the disk's raw write and read bandwidth for the same number
of bytes, measured with dd (conv=fsync) in the same run. One rank, a 8-layer hidden-512 GPT (about 30M
parameters: fp32 weights plus AdamW's two moments). Usage: python bench/bench_checkpoint.py"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import shardforge, write_result  # noqa: E402

MODEL = [
    "model.num_layers=8",
    "model.hidden_size=512",
    "model.num_attention_heads=8",
    "model.ffn_hidden_size=1536",
    "data.seq_length=64",
    "tokenizer.vocab_size=4096",
    "data.max_documents=200",
    "data.dedup_near=false",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "train.eval_interval=1000",
    "logging.log_interval=1000",
    "checkpoint.interval=2",
]


def dd(src: str, dst: str, count_mb: int, fsync: bool) -> float:
    extra = ["conv=fsync"] if fsync else []
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={count_mb}", *extra], check=True, capture_output=True
    )
    return time.perf_counter() - t0


def main() -> None:
    tmp = Path(tempfile.mkdtemp(dir=REPO / "runs" if (REPO / "runs").is_dir() else None))
    over = [f"run_dir={tmp}", *MODEL]
    shardforge("data", "prepare", "-c", "configs/tiny.yaml", *over)
    shardforge("train", "-c", "configs/tiny.yaml", *over, "train.max_steps=4")
    saves = json.loads((tmp / "train_result.json").read_text())["checkpoint_saves"]
    asyn = tmp / "async"
    shardforge(
        "train",
        "-c",
        "configs/tiny.yaml",
        *over,
        f"run_dir={asyn}",
        f"data.output_dir={tmp}/data",
        "train.max_steps=4",
        "checkpoint.async_save=true",
    )
    async_saves = json.loads((asyn / "train_result.json").read_text())["checkpoint_saves"]
    shardforge("train", "-c", "configs/tiny.yaml", *over, "train.max_steps=5", "checkpoint.interval=100")
    load_s = json.loads((tmp / "train_result.json").read_text())["checkpoint_load_seconds"]
    size = saves[-1]["bytes"]
    mb = max(1, round(size / 2**20))
    raw = tmp / "dd.bin"
    write_s = dd("/dev/zero", str(raw), mb, fsync=True)
    read_s = dd(str(raw), "/dev/null", mb, fsync=False)
    save_s = min(s["blocked_seconds"] for s in saves)
    shutil.rmtree(tmp, ignore_errors=True)  # the runs are only measured
    write_result(
        "checkpoint",
        {
            "checkpoint_mb": round(size / 1e6, 1),
            "save_mb_per_s": round(size / 1e6 / save_s, 1),
            "disk_write_fsync_mb_per_s": round(mb * 2**20 / 1e6 / write_s, 1),
            "save_vs_disk_write": round(write_s / save_s * size / (mb * 2**20), 3),
            "load_mb_per_s": round(size / 1e6 / load_s, 1),
            "disk_read_mb_per_s": round(mb * 2**20 / 1e6 / read_s, 1),
            "load_vs_disk_read": round(read_s / load_s * size / (mb * 2**20), 3),
            "sync_save_blocked_s": round(save_s, 3),
            "async_save_blocked_s": round(min(s["blocked_seconds"] for s in async_saves), 3),
            "async_save_total_s": round(min(s["seconds"] for s in async_saves), 3),
            "notes": "save = copy the rank's share to host + safetensors written with sha256s + fsync + manifest "
            "+ rename (synchronous: the training loop is blocked for all of it); dd writes zeros with conv=fsync; "
            "reads are from the page cache in both",
        },
    )


if __name__ == "__main__":
    main()
