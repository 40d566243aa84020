"""Shared helpers for benchmarks: timing, machine description, writing results/NAME.json."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def write_result(name: str, figures: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **figures}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def shardforge(*args: str, **env: str) -> None:
    """Run a `shardforge` command from the repository root (CPU DeepSpeed, no inherited rank variables)."""
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"DS_ACCELERATOR": "cpu"}
    subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        cwd=Path(__file__).resolve().parents[1],
        env=base | env,
        check=True,
        capture_output=True,
    )
