"""Training through a real Slurm: submit, the time-limit signal with requeue, chains, failures, quoting."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, TRAIN_ENV, assert_same_model_state, layout_args, train_command
from slurm_helpers import logged_step, scontrol_job, wait_for


def env() -> dict:
    return {**os.environ, **TRAIN_ENV}  # at call time: the cluster fixture sets SLURM_CONF


# long enough that the time-limit start (USR1 at most 30 s after step 10) cannot finish before it: ~9 steps/s while
# the reference run shares the 2 cores (~18 alone), so ~300 steps at most
STEPS = 600
COMMON = [
    f"train.max_steps={STEPS}",
    f"train.eval_interval={STEPS}",
    "checkpoint.interval=100000",
    "logging.log_interval=10",
    *layout_args(dp=2, zero=1),
]
GRACE = 80  # USR1 80 s before the limit: with a 2-minute limit, 10 to 40 s after the start (Slurm's 30 s timer)
SLURM = ["slurm.cpus_per_task=1", "slurm.cpu_bind=none", f"slurm.signal_grace_s={GRACE}"]


def submit(run: Path, prepared: Path, *extra: str, flags=("--nodes", "2", "--time", "10")) -> list[str]:
    cmd = [sys.executable, "-m", "launcher.cli", "slurm", "submit", "-c", "configs/tiny.yaml", f"run_dir={run}"]
    cmd += [f"data.output_dir={prepared}", *COMMON, *SLURM, *extra, *flags]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split()[-1] for line in r.stdout.splitlines() if line.startswith("submitted batch job")]


def history(run: Path) -> list[tuple[str, str]]:
    path = run / "slurm" / "history.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
    return [(r[2], r[3].split(" on ")[0]) for r in rows]


def diagnosis(run: Path, job: str) -> str:
    """What a failed wait prints: the job's state, its history and the end of its log."""
    log = "".join(p.read_text() for p in sorted((run / "slurm").glob("train-*.out")))
    hist = (run / "slurm" / "history.tsv").read_text() if (run / "slurm" / "history.tsv").exists() else ""
    info = scontrol_job(job)
    state = {k: info.get(k) for k in ("JobState", "Reason", "Restarts", "RunTime", "TimeLimit", "ExitCode")}
    return f"\njob {state}\nhistory:\n{hist}log tail:\n" + "\n".join(log.splitlines()[-25:])


def held_after_requeue(job: str, restarts: int) -> bool:
    info = scontrol_job(job)
    return info.get("JobState") == "PENDING" and info.get("Restarts") == str(restarts)


def nodes_idle() -> bool:
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
    return bool(states) and all(s == "idle" for s in states)


def release(job: str, minutes: int) -> None:
    """What an operator does: skip Slurm's ~2 min hold of a requeued job, and set its time limit. First the nodes
    must have finished with the previous start (Slurm revokes that start's credential; a start within the same
    second is refused as 'Job credential revoked', which is what the hold protects against)."""
    wait_for(nodes_idle, "the nodes to finish the previous start", timeout=60)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}", "StartTime=now"], check=True)


def test_the_time_limit_signal_checkpoints_requeues_and_matches_an_uninterrupted_run(slurm_cluster, prepared,
                                                                                    tmp_path):  # fmt: skip
    """2 emulated nodes x 1 task, a 2-minute time limit: Slurm's own USR1 (80 s before the limit) -> checkpoint,
    exit 75, requeue; the second start finishes. A preemption (`scancel --signal=USR1`, or Slurm's own preemption
    signal) takes the same path through the script. Job name and run directory are hostile."""
    reference = tmp_path / "reference"
    ref = subprocess.Popen(train_command(reference, prepared, *COMMON), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    pwned = tmp_path / "pwned"
    name = f'tiny\'; touch {pwned}; echo "$(touch {pwned})" `touch {pwned}` #'
    run = tmp_path / f"run with spaces $(touch {pwned.name}) `x`"
    # Slurm looks at limits every 30 s and signals once `now + 30 s + grace >= end`: with 2 minutes and a grace of
    # 80 s, from 10 s into the start on, so at its next look, long before the last step.
    # `submit` refuses a limit under 140 s with that grace; an operator sets it once the ranks run (a USR1 before
    # a rank's first instructions kills it: seen when the limit was set at submission)
    [job] = submit(run, prepared, flags=("--nodes", "2", "--time", "10", "--job-name", name))
    assert scontrol_job(job)["JobName"] == name.split()[0]  # scontrol -o splits on spaces; squeue shows it whole
    shown = subprocess.run(["squeue", "-h", "-j", job, "-o", "%j"], capture_output=True, text=True).stdout.strip()
    assert shown == name

    why = lambda: diagnosis(run, job)  # noqa: E731
    wait_for(lambda: logged_step(run) >= 10, "step 10 in the job log", timeout=180, explain=why)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=2"], check=True)  # USR1 within 30 s
    wait_for(lambda: held_after_requeue(job, 1), "the requeue before the time limit", timeout=180, explain=why)
    release(job, minutes=10)
    wait_for(lambda: (run / "slurm" / "DONE").exists(), "the second start to finish", timeout=300, explain=why)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]

    assert history(run) == [("0", "started"), ("0", "requeued"), ("1", "started"), ("1", "finished")]
    log = "".join(p.read_text() for p in (run / "slurm").glob("train-*.out"))
    assert "(restart 1 of at most 10)" in log
    [stopped_at] = [int(n) for n in re.findall(r"preempted by a signal at step (\d+)", log)]
    result = json.loads((run / "train_result.json").read_text())
    assert result["steps"] == STEPS and 0 < result["start_step"] == stopped_at < STEPS and result["resumed_from"]
    assert_same_model_state(run, reference)  # weights and AdamW moments bitwise, after the requeue
    assert not pwned.exists() and not (REPO / pwned.name).exists()

    status = subprocess.run([sys.executable, "-m", "launcher.cli", "slurm", "status", str(run)], cwd=REPO,
                            capture_output=True, text=True).stdout  # fmt: skip
    assert re.search(rf"^\s*{job}\s+COMPLETED\s+1\s", status, re.M) and f"last step {STEPS}/{STEPS}" in status


def test_chain_of_dependent_jobs_instead_of_requeue(slurm_cluster, prepared, tmp_path):
    """--chain 2: the first job stops at train.exit_interval (exit 75, no requeue), the second resumes. Launched
    as one torchrun per node (slurm.launch=torchrun), which meet across the two emulated nodes."""
    run = tmp_path / "chain"
    first, second = submit(run, prepared, "train.max_steps=40", "train.exit_interval=20", "slurm.launch=torchrun",
                           "--chain", "2")  # fmt: skip
    assert scontrol_job(second)["Dependency"].startswith(f"afterany:{first}")
    wait_for(lambda: (run / "slurm" / "DONE").exists(), "the chain to finish", timeout=300)
    assert history(run) == [("0", "started"), ("0", "checkpointed: chain continues"), ("0", "started"),
                            ("0", "finished")]  # fmt: skip
    result = json.loads((run / "train_result.json").read_text())
    assert result["start_step"] == 20 and result["steps"] == 40 and result["layout"].startswith("tp=1 pp=1 dp=2")
    script = (run / "slurm" / "train.sbatch").read_text()
    assert "--no-requeue" in script and "LAUNCH=torchrun" in script


def test_a_failing_job_is_not_requeued(slurm_cluster, prepared, tmp_path):
    run = tmp_path / "fails"
    [job] = submit(run, prepared, "data.seq_length=32")  # the shards hold 64: a user error, exit 2
    wait_for(lambda: history(run)[-1:] == [("0", "failed: exit 2")], "the failure record", timeout=120)
    wait_for(lambda: scontrol_job(job).get("JobState") == "FAILED", "state FAILED", timeout=60)
    assert scontrol_job(job)["Restarts"] == "0"
    log = "".join(p.read_text() for p in (run / "slurm").glob("train-*.out"))
    assert "not requeued" in log and "data.seq_length=32" in log
