"""The watchdog's timeouts, on the real supervisor (a forked rank, its shared-memory heartbeat, SIGSTOP). The hang
of a rank in a Slurm job, found and requeued: tests/slurm/test_slurm_recovery.py."""

from __future__ import annotations

import json
import os
import signal
import time
from types import SimpleNamespace

from core.config import validate_config
from core.errors import EXIT_HANG
from launcher.supervise import supervise
from training import preemption as heartbeat
from training.callbacks import Heartbeat


def test_a_rank_stopped_after_its_step_gets_the_step_timeout_and_a_save_gets_the_phase_timeout(tmp_path, monkeypatch):
    """The rank beats at the end of step 1, spends 2 s in a checkpoint save (longer than the 1 s step timeout: not a
    hang), then stops in the callbacks that follow (where an all-gather or the preemption all-reduce wait on other
    ranks). The supervisor must report a hang at step 1 in phase "step", not wait for the 30 s phase timeout."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    watchdog = {"step_timeout_s": 1.0, "phase_timeout_s": 30.0, "poll_s": 0.1}
    cfg = validate_config({"run_dir": str(tmp_path), "watchdog": watchdog}, "test")

    def rank() -> int:
        callback = Heartbeat()
        callback.on_train_start(SimpleNamespace(state=SimpleNamespace(step=0)))
        callback.on_step_end(None, SimpleNamespace(step=1))
        with heartbeat.long_phase(1):
            time.sleep(2.0)
        os.kill(os.getpid(), signal.SIGSTOP)
        return 0

    assert supervise(cfg, 0, rank) == EXIT_HANG
    [report_file] = (tmp_path / "hang").glob("*-rank-00000.json")
    report = json.loads(report_file.read_text())
    assert (report["phase"], report["step"], report["process_state"]) == ("step", 1, "T")
    assert 1.0 <= report["seconds_since_heartbeat"] < 30.0  # rounded to 0.1 s
