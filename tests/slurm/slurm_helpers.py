"""Helpers for the real-Slurm tests (the cluster fixture lives in tests/conftest.py)."""

from __future__ import annotations

import subprocess
import time


def scontrol_job(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Reason, Restarts, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def logged_step(run) -> int:
    """The last step a job's log reports (0 before the first)."""
    from launcher.slurm import last_step

    return (last_step(run) or (0,))[0]


def wait_for(predicate, what: str, timeout: float = 300, every: float = 0.5, explain=None):
    """Poll ``predicate`` until it is truthy; on timeout fail with ``explain()`` (e.g. the job's log) appended."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (explain() if explain else ""))


def rank_processes(config_file) -> dict[int, int]:
    """Rank -> pid of the training process (the supervisor's child) of the job whose frozen config is
    ``config_file``: every emulated node runs on this host, so the test can signal a rank directly."""
    import os
    from pathlib import Path

    def cmdline(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        cmd = cmdline(pid)
        if "launcher.train" not in cmd or str(config_file) not in cmd:
            continue
        try:
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "launcher.train" in cmdline(ppid):  # a child of a supervisor: the rank itself
            rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"SLURM_PROCID=")), None)
            if rank is not None:
                found[rank] = int(pid)
    return found
