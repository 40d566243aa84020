"""Hang detection: each rank runs as the child of a small supervisor process that watches its heartbeat.

The design of nvidia-resiliency-ext's rank monitors (a side process per rank, one timeout for start-up and one
for steps, longer sections for checkpoints), without its launcher: Shardforge starts ranks with srun (one task per
device), torchrun or its own local spawner, and all three start ``python -m launcher.train``, which forks here.

On a missed heartbeat the supervisor writes ``RUN_DIR/hang/<start>-rank-R.json`` (rank, host, phase, step, the
seconds since the last beat, and the rank's process state: ``T`` stopped, ``D`` in uninterruptible I/O, ``R``
running, ``S`` waiting, as a rank blocked in a collective behind another one is), sends the rank SIGCONT and
SIGUSR2 (Python's faulthandler prints every thread's stack into ``<start>-rank-R.stacks.txt``, even from a
stopped process or one stuck in C code), stops it again, waits until every rank has reported (a rank blocked
behind the hung one misses its heartbeats too; at most one more timeout), kills it, and exits with
:data:`core.errors.EXIT_HANG`. So every rank leaves its stack, and none runs on to fail with a reset connection.
On GPUs the NCCL flight recorder is enabled as well (``TORCH_FR_BUFFER_SIZE``), dumping into the same
folder on a NCCL timeout.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from core.config import RunConfig
from core.errors import EXIT_HANG
from training import preemption as heartbeat

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def start_tag() -> str:
    """Names this start's files: the Slurm job and restart, or the local process."""
    if "SLURM_JOB_ID" in os.environ:
        return f"job{os.environ['SLURM_JOB_ID']}-r{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return f"local{os.getpid()}"


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def _child(main: Callable[[], int], stacks: Path) -> None:
    """In the forked rank: die with the supervisor, print stacks on SIGUSR2, run, and exit with main's code."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    code = 1
    try:
        faulthandler.register(signal.SIGUSR2, file=open(stacks, "w"), all_threads=True)  # noqa: SIM115
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def supervise(cfg: RunConfig, rank: int, main: Callable[[], int]) -> int:
    """Run ``main`` in a forked child under the watchdog; return its exit code (128 + S when killed by signal S)
    or EXIT_HANG."""
    w, hang_dir, tag = cfg.watchdog, Path(cfg.run_dir) / "hang", start_tag()
    hang_dir.mkdir(parents=True, exist_ok=True)
    stacks = hang_dir / f".{tag}-rank-{rank:05d}.stacks"
    hb = heartbeat.create()
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")  # the flight recorder of NCCL collectives (not gloo)
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(hang_dir / f"{tag}-nccl-trace-rank-"))
    pid = os.fork()
    if pid == 0:
        _child(main, stacks)
    for sig in FORWARDED:  # Slurm signals every process; a local Ctrl-C or a launcher may signal only this one
        signal.signal(sig, lambda signum, frame: _send(pid, signum))
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
            age, step, phase = hb.read()
            limit = w.step_timeout_s if phase == heartbeat.STEP else w.phase_timeout_s
            if phase != heartbeat.DONE and age > limit:
                return _on_hang(pid, rank, hang_dir, tag, stacks, age, step, phase, limit, w.poll_s)
            time.sleep(w.poll_s)
    finally:
        stacks.unlink(missing_ok=True)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _on_hang(pid: int, rank: int, hang_dir: Path, tag: str, stacks: Path, age: float, step: int, phase: int,
             limit: float, poll_s: float) -> int:  # fmt: skip
    host = socket.gethostname()
    report = {"rank": rank, "host": os.environ.get("SLURMD_NODENAME", host), "step": step,
              "phase": heartbeat.PHASE_NAMES[phase], "seconds_since_heartbeat": round(age, 1), "timeout_s": limit,
              "process_state": process_state(pid), "time": time.time()}  # fmt: skip
    (hang_dir / f"{tag}-rank-{rank:05d}.json").write_text(json.dumps(report) + "\n")
    _send(pid, signal.SIGUSR2)  # pending while stopped: printed as soon as SIGCONT lets it run
    _send(pid, signal.SIGCONT)
    final = hang_dir / f"{tag}-rank-{rank:05d}.stacks.txt"
    for _ in range(250):  # up to 5 s for faulthandler to write
        time.sleep(0.02)
        if stacks.exists() and stacks.stat().st_size > 0 and "File" in stacks.read_text(errors="replace"):
            break
    _send(pid, signal.SIGSTOP)  # frozen, not killed yet: the ranks blocked behind it must notice and dump too
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    deadline = time.monotonic() + limit + 2 * poll_s
    while len(list(hang_dir.glob(f"{tag}-rank-*.json"))) < world and time.monotonic() < deadline:
        time.sleep(poll_s)
    _send(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    if stacks.exists():
        os.replace(stacks, final)
    print(f"error: rank {rank} on {report['host']}: no heartbeat for {age:.0f} s in {report['phase']} (step {step}, "
          f"timeout {limit:.0f} s, process state {report['process_state']}); stacks in {final}; exit {EXIT_HANG}",
          file=sys.stderr, flush=True)  # fmt: skip
    return EXIT_HANG
