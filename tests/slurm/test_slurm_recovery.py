"""Recovery and monitoring on the real Slurm: a crashed rank and a hung rank each cost one requeue onto another
node; a straggler is named with its node."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import REPO, assert_same_model_state, layout_args, train_command
from slurm_helpers import logged_step, rank_processes, scontrol_job, wait_for
from test_slurm_jobs import diagnosis, env, release, submit

from launcher.supervise import process_state

STEPS = 80
STEP_TIMEOUT = 5
RUN = [f"train.max_steps={STEPS}", f"train.eval_interval={STEPS}", "checkpoint.interval=20", "logging.log_interval=5",
       *layout_args(dp=2, zero=1), f"watchdog.step_timeout_s={STEP_TIMEOUT}", "watchdog.poll_s=0.5"]  # fmt: skip
ONE_NODE = ("--nodes", "1", "--time", "10")  # 2 ranks on one of the 2 nodes: the other one is spare


def history(run) -> list[tuple[str, str]]:
    """(restart, event) rows of RUN_DIR/slurm/history.tsv, events whole."""
    path = run / "slurm" / "history.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
    return [(r[2], r[3]) for r in rows]


def pending_after(run, job: str, restarts: int) -> dict | None:
    """The job's record once it is pending again and the script has written what it did (after the exclusion)."""
    info = scontrol_job(job)
    ok = info.get("JobState") == "PENDING" and info.get("Restarts") == str(restarts)
    return info if ok and history(run)[-1][1].startswith(("crashed", "hang")) else None


def stop_in_a_step(run, pid: int, reports: str, why, tries: int = 3) -> float:
    """SIGSTOP ``pid`` until its supervisor reports the hang (``RUN_DIR/hang/<reports>``) within the step timeout;
    returns when the successful stop began. A stop that lands in a checkpoint save is covered by the phase timeout
    (900 s), as it should be: the rank is let go (SIGCONT) and stopped again after its next logged step."""
    for _ in range(tries):
        stopped = time.time()
        os.kill(pid, signal.SIGSTOP)
        while time.time() < stopped + STEP_TIMEOUT + 15:
            if list((run / "hang").glob(reports)):
                return stopped
            time.sleep(0.5)
        os.kill(pid, signal.SIGCONT)
        before = logged_step(run)
        wait_for(lambda: logged_step(run) > before, "a step after the save", timeout=60, explain=why)  # noqa: B023
    raise AssertionError(f"no hang report after {tries} stops of rank pid {pid}" + why())


def test_a_crash_and_a_hang_are_requeued_on_the_other_node_and_finish_bitwise_equal(slurm_cluster, prepared,
                                                                                    tmp_path):  # fmt: skip
    """SIGKILL of rank 1 after the step-20 checkpoint: a crash, requeued with its node excluded. In the second start
    SIGSTOP of rank 0: no heartbeat for STEP_TIMEOUT s, every rank's stack in RUN_DIR/hang, exit 76, requeued with
    that node excluded. The third start finishes with weights equal to an uninterrupted run's."""
    reference = tmp_path / "reference"
    ref = subprocess.Popen(train_command(reference, prepared, *RUN), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    run = tmp_path / "recover"
    [job] = submit(run, prepared, *RUN, flags=ONE_NODE)
    config = run / "slurm" / "config.yaml"
    why = lambda: diagnosis(run, job)  # noqa: E731

    wait_for(lambda: logged_step(run) >= 25, "step 25", timeout=180, explain=why)
    first_node = scontrol_job(job)["NodeList"]
    os.kill(rank_processes(config)[1], signal.SIGKILL)
    info = wait_for(lambda: pending_after(run, job, 1), "the requeue after the crash", timeout=120, explain=why)
    assert info["ExcNodeList"] == first_node
    assert history(run)[-1][1].startswith(f"crashed: exit 137 on {first_node}; requeued from step_")

    release(job, minutes=10)
    wait_for(lambda: logged_step(run) >= 45 and len(rank_processes(config)) == 2, "step 45 after resume",
             timeout=180, explain=why)  # fmt: skip
    second_node = scontrol_job(job)["NodeList"]
    assert second_node != first_node
    stopped = stop_in_a_step(run, rank_processes(config)[0], f"job{job}-r1-rank-*.json", why)
    info = wait_for(lambda: pending_after(run, job, 2), "the requeue after the hang", timeout=120, explain=why)
    assert info["ExcNodeList"] == second_node
    assert history(run)[-1][1].startswith(f"hang: exit 76 on {second_node}; requeued from step_")
    reports = {r: json.loads((run / "hang" / f"job{job}-r1-rank-{r:05d}.json").read_text()) for r in (0, 1)}
    # the stopped rank is named by its state; the other waits on it, asleep or (when rank 0's supervisor resumed it
    # for a moment to print its stack, which can move the collective on) just woken: anything but stopped
    assert reports[0]["process_state"] == "T" and reports[1]["process_state"] in ("S", "R")
    for r, rep in reports.items():
        assert STEP_TIMEOUT <= rep["seconds_since_heartbeat"] <= STEP_TIMEOUT + 5 and rep["phase"] == "step"
        assert stopped < rep["time"] <= stopped + STEP_TIMEOUT + 10
        stacks = (run / "hang" / f"job{job}-r1-rank-{r:05d}.stacks.txt").read_text()
        # where each rank was: in the training loop, inside a step or its callbacks (the rank that waits for the
        # stopped one blocks in a collective of either: the step's loss mean, the callbacks' preemption check)
        assert 'File "' in stacks and " in fit" in stacks
        assert " in train_step" in stacks or " in on_step_end" in stacks

    release(job, minutes=10)
    wait_for(lambda: (run / "slurm" / "DONE").exists(), "the third start to finish", timeout=300, explain=why)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    assert [h[0] for h in history(run)] == ["0", "0", "1", "1", "2", "2"]
    assert history(run)[-1] == ("2", "finished") and history(run)[0][1].startswith("started on")
    result = json.loads((run / "train_result.json").read_text())
    assert result["steps"] == STEPS and result["start_step"] >= 40
    assert_same_model_state(run, reference)
    log = "".join(p.read_text() for p in (run / "slurm").glob("train-*.out"))
    assert "0: step" in log and "1: " in log  # srun --label: every rank's lines carry its rank
    good = json.loads((run / "goodput.json").read_text())  # the crashed starts' records end at their last interval
    assert [s["last_step"] for s in good["starts"]][2] == STEPS and len(good["starts"]) == 3
    assert good["starts"][0]["lost_s"] == 0 and good["starts"][1]["lost_s"] > 0 and good["starts"][2]["lost_s"] > 0
    parts = ("startup_s", "steps_s", "data_wait_s", "validation_s", "checkpoint_s", "other_s", "lost_s")
    for start in good["starts"]:  # the parts cover each start's wall time
        assert abs(sum(start[p] for p in parts) - start["wall_s"]) <= 0.05 * start["wall_s"], start
    assert abs(good["totals"]["wall_s"] - sum(s["wall_s"] for s in good["starts"])) < 1e-6
    status = subprocess.run([sys.executable, "-m", "launcher.cli", "slurm", "status", str(run)], cwd=REPO,
                            capture_output=True, text=True).stdout  # fmt: skip
    assert "over 3 starts" in status and "goodput " in status


def test_a_crash_before_any_checkpoint_is_not_requeued(slurm_cluster, prepared, tmp_path):
    run = tmp_path / "early"
    [job] = submit(run, prepared, *RUN, "checkpoint.interval=1000", flags=ONE_NODE)
    config = run / "slurm" / "config.yaml"
    wait_for(lambda: logged_step(run) >= 5, "step 5", timeout=180, explain=lambda: diagnosis(run, job))
    os.kill(rank_processes(config)[1], signal.SIGKILL)
    wait_for(lambda: scontrol_job(job).get("JobState") == "FAILED", "state FAILED", timeout=120)
    assert scontrol_job(job)["Restarts"] == "0"
    assert history(run)[-1][1].endswith("not requeued: no checkpoint since this start")


def test_a_rank_paused_from_outside_is_named_as_the_straggler(slurm_cluster, prepared, tmp_path):
    """2 emulated nodes x 1 rank. From step 10 on, rank 1 is stopped for 100-200 ms, 20-100 ms apart, when it is
    found computing, as a slow device would be (or after 0.3 s without finding it so: a test sharing the CPU can hold
    the pauser or the peer): it arrives last at every collective, so its busy time (step time less data and
    collective waits) is the cluster's maximum in the fully paused log intervals (10 steps, several pauses), and the
    warning names it and its node."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "straggler"
    args = ["train.max_steps=110", "train.eval_interval=1000", "checkpoint.interval=1000", "logging.log_interval=10",
            "logging.straggler_share=0.5", "logging.straggler_intervals=2", *layout_args(dp=2)]  # fmt: skip
    [job] = submit(run, prepared, *args, flags=("--nodes", "2", "--time", "10"))
    config = run / "slurm" / "config.yaml"
    why = lambda: diagnosis(run, job)  # noqa: E731
    wait_for(lambda: logged_step(run) >= 10 and len(rank_processes(config)) == 2, "step 10", timeout=180,
             explain=why)  # fmt: skip
    slow, paused_from = rank_processes(config)[1], logged_step(run)
    until = time.monotonic() + 300  # no scontrol call in the loop: under a shared CPU it took most of a cycle
    jitter, last = random.Random(0), time.monotonic()
    while not (run / "slurm" / "DONE").exists() and time.monotonic() < until:
        try:  # stopped inside a collective, it would hold its peer there too: wait (up to 0.3 s) until it computes
            if process_state(slow) != "R" and time.monotonic() - last < 0.3:  # R: running or runnable
                time.sleep(0.002)
                continue
            os.kill(slow, signal.SIGSTOP)
            time.sleep(jitter.uniform(0.1, 0.2))
            os.kill(slow, signal.SIGCONT)
        except ProcessLookupError:  # the rank ended
            break
        last = time.monotonic()
        time.sleep(jitter.uniform(0.02, 0.1))
    wait_for(lambda: (run / "slurm" / "DONE").exists(), "the job to finish", timeout=120, explain=why)
    result = json.loads((run / "train_result.json").read_text())
    # before the pauses a test sharing the CPU may slow either rank: once two fully paused intervals were seen, only
    # rank 1 is named (the task on the second node)
    warned = {(w[1], w[2]) for w in result["straggler_warnings"] if w[0] > paused_from + 20}
    assert warned == {(1, "node2")}, (paused_from, result["straggler_warnings"])
    log = "".join(p.read_text() for p in (run / "slurm").glob("train-*.out"))
    assert "warning: straggler rank 1 on node2" in log
    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    top = [int(e.value) for e in ea.Scalars("cluster/busy_s_max_rank") if e.step > paused_from + 10]
    assert len(top) == (110 - paused_from) // 10 - 1 >= 7 and top.count(1) >= len(top) - 2, (paused_from, top)
