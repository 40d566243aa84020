"""``make quickstart``: the whole pipeline on the built-in corpus, on this machine.

Prepares the data (or reuses it), trains on ``parallel.nproc`` local ranks, interrupts the run once with SIGTERM
half-way (it checkpoints and exits with the requeue code), resumes it, then trains an uninterrupted copy and
prints whether the resumed losses match; then evaluates the final checkpoint on the test split, generates a
sample and exports a Hugging Face Llama folder. Everything lands under ``run_dir`` (runs/quickstart/).
``python -m launcher.quickstart [--data DIR] [key=value ...]`` trains on an already-prepared dataset and applies
overrides to configs/quickstart.yaml (the test suite runs it so, small).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from core.config import load_config
from core.errors import EXIT_REQUEUE

CONFIG = "configs/quickstart.yaml"


def shardforge(*args: str, check: bool = True) -> int:
    rc = subprocess.call([sys.executable, "-m", "launcher.cli", *args])
    if check and rc != 0:
        sys.exit(rc)
    return rc


def train_interrupted(over: list[str], at_step: int) -> int:
    """Train, send SIGTERM once the log shows ``at_step``; return the exit code."""
    cmd = [sys.executable, "-m", "launcher.cli", "train", "-c", CONFIG, *over, "logging.log_interval=5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sent = False
    for line in proc.stdout:
        print(line, end="", flush=True)
        parts = line.split()
        if not sent and len(parts) > 1 and parts[0] == "step" and "/" in parts[1]:
            if int(parts[1].split("/")[0]) >= at_step:
                print(f">>> quickstart: sending SIGTERM at step {parts[1]} (as a preemption would)", flush=True)
                proc.send_signal(signal.SIGTERM)
                sent = True
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="launcher.quickstart", description="the whole pipeline, end to end")
    ap.add_argument("--data", help="an already-prepared dataset to train on (skips data prepare)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of configs/quickstart.yaml")
    args = ap.parse_args(argv)
    over = [*args.overrides, *([f"data.output_dir={args.data}"] if args.data else [])]
    cfg = load_config(CONFIG, over)
    run = Path(cfg.run_dir)
    for stale in (cfg.checkpoint.dir, cfg.logging.tensorboard_dir, run / "reference"):
        shutil.rmtree(stale, ignore_errors=True)
    if not args.data:
        shardforge("data", "prepare", "-c", CONFIG, *over)
    rc = train_interrupted(over, cfg.train.max_steps // 2)
    if rc != EXIT_REQUEUE:
        print(f"quickstart: expected the requeue exit code {EXIT_REQUEUE} after SIGTERM, got {rc}")
        return 1
    first = json.loads((run / "train_result.json").read_text())
    print(f">>> quickstart: checkpointed at step {first['steps']} and exited with {rc}; resuming", flush=True)
    shardforge("train", "-c", CONFIG, *over)
    second = json.loads((run / "train_result.json").read_text())
    print(">>> quickstart: training an uninterrupted copy to compare", flush=True)
    ref_dir = run / "reference"
    shardforge(
        "train",
        "-c",
        CONFIG,
        *over,
        f"run_dir={ref_dir}",
        f"data.output_dir={cfg.data.output_dir}",
        "logging.log_interval=1000",
        "checkpoint.interval=100000",
    )
    ref = json.loads((ref_dir / "train_result.json").read_text())
    resumed = first["losses"] + second["losses"]
    diff = max(abs(a - b) / abs(b) for a, b in zip(resumed, ref["losses"]))
    same = len(resumed) == len(ref["losses"]) and diff == 0.0
    print(
        f"resume check: {len(resumed)} losses, interrupted+resumed vs uninterrupted: max relative difference "
        f"{diff:.1e} -> {'MATCH (bitwise)' if same else 'DIFFERENT'}"
    )
    print(f"final validation loss {second['val'][-1][1]:.4f}")
    ckpt = str(cfg.checkpoint.dir)
    print(">>> quickstart: evaluating the final checkpoint on the test split", flush=True)
    shardforge("eval", "-c", CONFIG, *over, "--checkpoint", ckpt)
    print(">>> quickstart: a generated sample (greedy, KV cache)", flush=True)
    shardforge("generate", "--checkpoint", ckpt, "--prompt", "def main(argv):\n", "--temperature", "0",
               "--max-new-tokens", "48")  # fmt: skip
    shardforge("export", "hf", "--checkpoint", ckpt, "--out", str(run / "hf"), "--overwrite")
    print(f"quickstart outputs: {run}/ (data, tokenizer, checkpoints, tensorboard, eval/, hf/, train_result.json)")
    print(f"watch it: .venv/bin/shardforge tensorboard {run}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
