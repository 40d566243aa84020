"""Helpers for the real-Slurm tests (the cluster fixture lives in tests/conftest.py)."""

from __future__ import annotations

import subprocess
import time


def scontrol_job(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Reason, Restarts, ...)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(predicate, what: str, timeout: float = 300, every: float = 0.5, explain=None):
    """Poll ``predicate`` until it is truthy; on timeout fail with ``explain()`` (e.g. the job's log) appended."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (explain() if explain else ""))
