"""Cluster metrics on real gloo ranks: a straggler made from outside is named. (Goodput across a crash and two
requeues: tests/slurm/test_slurm_recovery.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import REPO, TRAIN_ENV, train_command

from training.cluster_metrics import stragglers


def rank_pids(run: Path) -> dict[int, int]:
    """Rank -> pid of the training process (a supervisor's child) of the local run into ``run``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if b"launcher.train" in cmd and b"launcher.train" in parent and str(run).encode() in cmd:
            found[int(next((e[5:] for e in env if e.startswith(b"RANK=")), b"0"))] = int(pid)
    return found


def wait_log(proc_log: Path, text: str, timeout: float = 120) -> None:
    end = time.time() + timeout
    while text not in (proc_log.read_text() if proc_log.exists() else ""):
        assert time.time() < end, f"no {text!r} in {proc_log}"
        time.sleep(0.1)


def test_straggler_rule_compares_with_the_other_ranks_median():
    assert stragglers([0.10, 0.10, 0.10, 0.16], 0.5) == [3]
    assert stragglers([0.10, 0.10, 0.10, 0.14], 0.5) == []
    assert stragglers([0.30, 0.10], 0.5) == [0] and stragglers([0.1], 0.5) == []


def test_a_rank_paused_from_outside_is_named_as_the_straggler(prepared, tmp_path):
    """Rank 1 is stopped for 150 ms every 250 ms from step 10 on: it arrives last at every collective, so its busy
    time (step time less data and collective waits) is the cluster's maximum, and the warning names it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, log = tmp_path / "run", tmp_path / "train.log"
    args = ["train.max_steps=60", "train.eval_interval=1000", "checkpoint.interval=1000", "logging.log_interval=5",
            "logging.straggler_share=0.5", "logging.straggler_intervals=2", "parallel.nproc=2"]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(train_command(run, prepared, *args), cwd=REPO, env={**os.environ, **TRAIN_ENV},
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        wait_log(log, "step     10/60")
        slow = rank_pids(run)[1]
        paused_from = 10
        while proc.poll() is None:
            try:
                os.kill(slow, signal.SIGSTOP)
                time.sleep(0.15)
                os.kill(slow, signal.SIGCONT)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    assert proc.wait() == 0, log.read_text()[-2000:]
    result = json.loads((run / "train_result.json").read_text())
    warned = [w[1] for w in result["straggler_warnings"]]
    assert len(warned) >= 1 and set(warned) == {1}, result["straggler_warnings"]
    assert "warning: straggler rank 1 on " in log.read_text()
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    top = [int(e.value) for e in ea.Scalars("cluster/busy_s_max_rank") if e.step > paused_from + 5]
    assert len(top) == 9 and top.count(1) >= 7, top  # intervals ending at steps 20..60
