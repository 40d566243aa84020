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
    """torchrun for ``nproc`` ranks: on this host alone, or (under a per-node Slurm step) one node of many."""
    nodes = ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    if per_node_step():
        nnodes = int(os.environ["SLURM_NNODES"])
        nproc //= nnodes
        nodes = [
            f"--nnodes={nnodes}",
            f"--node_rank={os.environ['SLURM_NODEID']}",
            f"--master_addr={os.environ['MASTER_ADDR']}",
            f"--master_port={os.environ['MASTER_PORT']}",
        ]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *nodes, "-m", module,
            "-c", config_path, *overrides]  # fmt: skip


def per_node_step() -> bool:
    """True in a Slurm step that runs one torchrun per node (slurm.launch=torchrun)."""
    return os.environ.get("SHARDFORGE_TORCHRUN_PER_NODE") == "1" and "SLURM_NODEID" in os.environ


def run_ranks(module: str, cfg: RunConfig, config_path: str, overrides: list[str]) -> int:
    """Run ``module`` once per rank: in this process for one rank, else through torchrun; return its exit code."""
    env = dict(os.environ)  # DeepSpeed's accelerator is chosen per rank (launcher.train): cuda if present, else cpu
    if cfg.parallel.nproc == 1 or (under_launcher() and not per_node_step()):
        return call_forwarding_signals([sys.executable, "-m", module, "-c", config_path, *overrides], env)
    env.setdefault("OMP_NUM_THREADS", "1")
    for var in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):  # ranks come from torchrun here
        env.pop(var, None)
    started = time.time()
    rc = call_forwarding_signals(torchrun_command(module, config_path, overrides, cfg.parallel.nproc), env)
    return _requeue_code(rc, Path(cfg.run_dir) / "train_result.json", started)


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # torchrun would die of it; the ranks install their own handler


def call_forwarding_signals(cmd: list[str], env: dict) -> int:
    """Run ``cmd``; SIGTERM/SIGINT go to it, SIGUSR1 to its descendants (the ranks checkpoint on them).

    torchrun has no SIGUSR1 handler, so it is started with SIGUSR1 ignored; Slurm, which signals every process
    of a step, then reaches the ranks without killing their parent.
    """
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_ignore_usr1)

    def forward(signum, frame) -> None:
        if signum == signal.SIGUSR1:
            for child in _descendants(proc.pid):
                _send(child, signum)
        proc.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _requeue_code(rc: int, result: Path, started: float) -> int:
    """torchrun reports any rank's non-zero exit as 1; keep "checkpointed, please requeue" visible."""
    if rc != 0 and result.is_file() and result.stat().st_mtime >= started:
        if json.loads(result.read_text()).get("requeue"):
            return EXIT_REQUEUE
    return rc
