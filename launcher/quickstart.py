"""``make quickstart``: the whole pipeline on the built-in corpus, on this machine.

Prepares the data (or reuses it), trains on ``parallel.nproc`` local ranks, interrupts the run once with SIGTERM
early on (it checkpoints and exits with the requeue code) and resumes it to the end; a short uninterrupted
reference run of the first steps after the interruption checks that the resumed losses match bitwise. Then it
evaluates the final checkpoint on the test split (bits per byte beside gzip's on the same text), samples a
continuation of real code (temperature 0.8, top-p 0.95, a fixed seed) and exports a Hugging Face Llama folder.
Everything lands under ``run_dir`` (runs/quickstart/).
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
        # the quickstart owns the data under its run folder: one left by an older version (another tokenizer, other
        # settings) is replaced instead of refused; data prepared elsewhere is never touched
        own = run.resolve() in Path(cfg.data.output_dir).resolve().parents
        shardforge("data", "prepare", "-c", CONFIG, *over, *(["--overwrite"] if own else []))
    at_step = max(1, cfg.train.max_steps // 10)
    rc = train_interrupted(over, at_step)
    if rc != EXIT_REQUEUE:
        print(f"quickstart: expected the requeue exit code {EXIT_REQUEUE} after SIGTERM, got {rc}")
        return 1
    first = json.loads((run / "train_result.json").read_text())
    print(f">>> quickstart: checkpointed at step {first['steps']} and exited with {rc}; resuming", flush=True)
    shardforge("train", "-c", CONFIG, *over)
    second = json.loads((run / "train_result.json").read_text())
    same = resume_check(cfg, over, first["losses"] + second["losses"], first["steps"])
    print(f"final validation loss {second['val'][-1][1]:.4f}")
    ckpt = str(cfg.checkpoint.dir)
    print(">>> quickstart: evaluating the final checkpoint on the test split", flush=True)
    shardforge("eval", "-c", CONFIG, *over, "--checkpoint", ckpt)
    print(">>> quickstart: a sampled continuation (temperature 0.8, top-p 0.95, seed 0; KV cache)", flush=True)
    shardforge("generate", "--checkpoint", ckpt, "--prompt", PROMPT, "--temperature", "0.8", "--top-p", "0.95",
               "--seed", "0", "--max-new-tokens", "160")  # fmt: skip
    shardforge("export", "hf", "--checkpoint", ckpt, "--out", str(run / "hf"), "--overwrite")
    print(f"quickstart outputs: {run}/ (data, tokenizer, checkpoints, tensorboard, eval/, hf/, train_result.json)")
    print(f"watch it: .venv/bin/shardforge tensorboard {run}")
    return 0 if same else 1


PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def resume_check(cfg, over: list[str], resumed: list[float], interrupted_at: int) -> bool:
    """Train an uninterrupted reference of the first steps past the interruption (``train.exit_interval`` stops
    it there) and compare its losses with the interrupted and resumed run's, bitwise."""
    run = Path(cfg.run_dir)
    steps = min(interrupted_at + 10, cfg.train.max_steps)
    print(f">>> quickstart: an uninterrupted reference of steps 1-{steps} to compare the resume with", flush=True)
    ref_dir = run / "reference"
    rc = shardforge("train", "-c", CONFIG, *over, f"run_dir={ref_dir}", f"data.output_dir={cfg.data.output_dir}",
                    "logging.log_interval=1000", "checkpoint.interval=100000", f"train.exit_interval={steps}",
                    check=False)  # fmt: skip
    if rc not in (0, EXIT_REQUEUE):
        sys.exit(rc)
    ref = json.loads((ref_dir / "train_result.json").read_text())["losses"]
    got = resumed[: len(ref)]
    diff = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    same = len(ref) == steps and len(got) == steps and diff == 0.0
    print(
        f"resume check: steps 1-{steps} (SIGTERM at step {interrupted_at}, then resumed) vs uninterrupted: max "
        f"relative difference of {len(got)} losses {diff:.1e} -> {'MATCH (bitwise)' if same else 'DIFFERENT'}"
    )
    return same


if __name__ == "__main__":
    sys.exit(main())
