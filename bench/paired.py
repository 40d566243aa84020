"""Paired step timing: `shardforge train` (one rank) with a step of another training loop beside each of its steps,
in the same process.

This machine's speed drifts by up to 30% between runs a minute apart, more than the differences measured, so two
loops timed in separate runs compare the machine's moments more than the loops. Paired, both see the same machine,
the same threads and the same memory. A shardforge step is the wall time from the start of one of its steps to the
start of the next (data, step, callbacks: logging, TensorBoard, the preemption check, the heartbeat) less the other
loop's step run inside it; the other loop's step runs after shardforge's on even steps and before it on odd ones
(so neither always inherits the other's caches and freed memory). The other loop is built in the rank, after the
supervisor's fork, by ``factory(train_args)`` (``"module:function"``), which returns a function running one step.

Usage (by the benchmarks): ``run("bench.bench_train:bare_loop", train_args, steps)``.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import LAUNCHER_VARS  # noqa: E402


def run(factory: str, train_args: list[str], steps: int) -> dict[str, list[float]]:
    """Seconds per step of both loops: ``{"shardforge": [...], "other": [...]}`` (``steps - 1`` and ``steps``)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"DS_ACCELERATOR": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-m", "bench.paired", str(out), factory, *train_args, f"train.max_steps={steps}"]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
        return json.loads(out.read_text())


def summary(times: dict[str, list[float]], warmup: int) -> dict:
    """Medians after ``warmup`` steps, in ms, and the median and quartiles of the per-step ratios other/shardforge
    (the other loop's share of shardforge's speed: tokens/s of shardforge over tokens/s of the other)."""
    sf, other = times["shardforge"][warmup:], times["other"][warmup:]
    n = min(len(sf), len(other))
    ratios = [o / s for s, o in zip(sf[:n], other[:n])]
    return {
        "paired_steps": n,
        "shardforge_ms": round(statistics.median(sf) * 1000, 2),
        "other_ms": round(statistics.median(other) * 1000, 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)],
    }


def worker(out: Path, factory: str, train_args: list[str]) -> None:
    from training.trainer import Trainer

    module, name = factory.split(":")
    make_step = getattr(importlib.import_module(module), name)
    original, times = Trainer.train_one_step, {"shardforge": [], "other": []}
    state = {"start": None, "other": 0.0, "step": None}

    def other_step() -> float:
        t0 = time.perf_counter()
        state["step"]()
        times["other"].append(time.perf_counter() - t0)
        return times["other"][-1]

    def paired(trainer: Trainer):
        now = time.perf_counter()
        if state["start"] is not None:
            times["shardforge"].append(now - state["start"] - state["other"])
        state["start"] = now
        before = state["step"] is not None and trainer.state.step % 2 == 1  # the other loop first every other step
        state["other"] = other_step() if before else 0.0
        metrics = original(trainer)
        if state["step"] is None:
            state["step"] = make_step(train_args)  # in the rank: after the fork, with its process groups
        if not before:
            state["other"] = other_step()
        if trainer.state.step == trainer.max_steps:
            out.write_text(json.dumps(times))
        return metrics

    Trainer.train_one_step = paired
    sys.argv = ["launcher.train", *train_args]
    runpy.run_module("launcher.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
