"""Local process spawning: ``shardforge train`` with ``parallel.nproc=N`` starts N ranks through torchrun."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launcher.config import RunConfig
from launcher.errors import EXIT_REQUEUE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher() -> bool:
    """True when a launcher (torchrun, srun) already started this process as one rank."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def torchrun_command(module: str, config_path: str, overrides: list[str], nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        module,
        "-c",
        config_path,
        *overrides,
    ]


def run_ranks(module: str, cfg: RunConfig, config_path: str, overrides: list[str]) -> int:
    """Run ``module`` once per rank: in this process for one rank, else through torchrun; return its exit code."""
    env = dict(os.environ)  # DeepSpeed's accelerator is chosen per rank (launcher.train): cuda if present, else cpu
    if cfg.parallel.nproc == 1 or under_launcher():
        return call_forwarding_signals([sys.executable, "-m", module, "-c", config_path, *overrides], env)
    env.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    rc = call_forwarding_signals(torchrun_command(module, config_path, overrides, cfg.parallel.nproc), env)
    return _requeue_code(rc, Path(cfg.run_dir) / "train_result.json", started)


def call_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run ``cmd``; SIGTERM/SIGUSR1/SIGINT sent to this process are passed on (the ranks checkpoint on them)."""
    proc = subprocess.Popen(cmd, env=env)
    forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {sig: signal.signal(sig, lambda s, f: proc.send_signal(s)) for sig in forwarded}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _requeue_code(rc: int, result: Path, started: float) -> int:
    """torchrun reports any rank's non-zero exit as 1; keep "checkpointed, please requeue" visible."""
    if rc != 0 and result.is_file() and result.stat().st_mtime >= started:
        if json.loads(result.read_text()).get("preempted"):
            return EXIT_REQUEUE
    return rc
