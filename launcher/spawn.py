"""Local process spawning: ``shardforge train`` with ``parallel.nproc=N`` starts N ranks on this host.

On one host the ranks are started directly, with the environment torchrun gives its workers (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``): a torchrun process in between only added its own
start-up (about 2 s of importing torch before any rank starts). Under a Slurm step with ``slurm.launch=torchrun``,
one torchrun per node starts that node's ranks and meets the other nodes' torchruns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.config import RunConfig
from core.errors import EXIT_REQUEUE
from core.net import free_port


def under_launcher() -> bool:
    """True when a launcher (torchrun, srun) already started this process as one rank."""
    return "RANK" in os.environ or "SLURM_PROCID" in os.environ


def torchrun_command(module: str, config_path: str, overrides: list[str], nproc: int) -> list[str]:
    """torchrun for this node's share of ``nproc`` ranks, in a Slurm step that runs one torchrun per node."""
    nnodes = int(os.environ["SLURM_NNODES"])
    nodes = [
        f"--nnodes={nnodes}",
        f"--node_rank={os.environ['SLURM_NODEID']}",
        f"--master_addr={os.environ['MASTER_ADDR']}",
        f"--master_port={os.environ['MASTER_PORT']}",
    ]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc // nnodes}", *nodes, "-m",
            module, "-c", config_path, *overrides]  # fmt: skip


def per_node_step() -> bool:
    """True in a Slurm step that runs one torchrun per node (slurm.launch=torchrun)."""
    return os.environ.get("SHARDFORGE_TORCHRUN_PER_NODE") == "1" and "SLURM_NODEID" in os.environ


def run_ranks(module: str, cfg: RunConfig, config_path: str, overrides: list[str]) -> int:
    """Run ``module`` once per rank: in this process's child for one rank, as a local group of ranks on one host,
    through torchrun for one node of a multi-node Slurm step; return the exit code."""
    env = dict(os.environ)  # DeepSpeed's accelerator is chosen per rank (launcher.train): cuda if present, else cpu
    cmd = [sys.executable, "-m", module, "-c", config_path, *overrides]
    if cfg.parallel.nproc == 1 or (under_launcher() and not per_node_step()):
        return call_forwarding_signals(cmd, env)
    env.setdefault("OMP_NUM_THREADS", "1")
    for var in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):  # ranks come from the launcher here
        env.pop(var, None)
    if not per_node_step():
        return run_local_group(cmd, env, cfg.parallel.nproc)
    started = time.time()
    rc = call_forwarding_signals(torchrun_command(module, config_path, overrides, cfg.parallel.nproc), env)
    return _requeue_code(rc, Path(cfg.run_dir) / "train_result.json", started)


def rank_env(env: dict, rank: int, nproc: int, port: int) -> dict:
    """The environment torchrun gives rank ``rank`` of ``nproc`` on one host."""
    return {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def run_local_group(cmd: list[str], env: dict, nproc: int, grace_s: float = 30.0) -> int:
    """``nproc`` copies of ``cmd`` on this host, one per rank. SIGTERM, SIGINT and SIGUSR1 go to every rank. When
    a rank fails, the others get SIGTERM and, ``grace_s`` later, SIGKILL (as torchrun does); a rank also dies
    with this process. Exit code: 0 when every rank succeeded, else the first failing rank's (a rank killed by
    signal S counts as 128 + S)."""
    port = free_port()
    procs = [subprocess.Popen(cmd, env=rank_env(env, r, nproc, port), preexec_fn=_die_with_parent)
             for r in range(nproc)]  # fmt: skip

    def forward(signum, frame) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    forwarded = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {sig: signal.signal(sig, forward) for sig in forwarded}
    try:
        return _wait_group(procs, grace_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_group(procs: list[subprocess.Popen], grace_s: float) -> int:
    failure, deadline = None, None
    while None in [p.poll() for p in procs]:  # a list: every rank polled each round
        if failure is None:
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                failure, deadline = failed[0], time.time() + grace_s
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
        elif time.time() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    if failure is None:
        failure = next((p.returncode for p in procs if p.returncode), 0)
    return 128 - failure if failure < 0 else failure


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL this rank when its spawning process dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


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
