"""Checkpoints on real ranks: exact resume, resume onto other layouts, corruption, signals, fault injection."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    TRAIN_ENV,
    assert_losses_close,
    assert_same_model_state,
    assert_same_tensors,
    layout_args,
    run_cli,
    shardforge_train,
    train_command,
)
from safetensors.torch import load_file

from core.config import validate_config
from core.errors import EXIT_INTEGRITY, EXIT_REQUEUE, EXIT_USAGE
from training.checkpoint.format import verify_checkpoint
from training.checkpoint.manager import CheckpointManager

ENV = {**os.environ, **TRAIN_ENV}


def _overrides(steps: int, extra) -> list[str]:
    return [f"train.max_steps={steps}", "checkpoint.interval=5", "train.eval_interval=5", *extra]


def args_for(run: Path, prepared: Path, steps: int, extra) -> list[str]:
    return train_command(run, prepared, *_overrides(steps, extra))


def train(run: Path, prepared: Path, steps: int = 10, extra=(), expect: int = 0) -> dict:
    r, result = shardforge_train(run, prepared, *_overrides(steps, extra))
    assert r.returncode == expect, r.stderr[-3000:]
    return result if expect in (0, EXIT_REQUEUE) else {"stderr": r.stderr}


@pytest.fixture(scope="module")
def full_run(prepared, tmp_path_factory) -> Path:
    """10 steps on one rank, a checkpoint every 5: the reference losses, and a run to copy and damage."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(run, prepared)
    return run


@pytest.fixture(scope="module")
def uninterrupted(full_run) -> dict:
    return json.loads((full_run / "train_result.json").read_text())


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.fixture(scope="module")
def zero2_cut(prepared, tmp_path_factory) -> Path:
    """2 ranks, ZeRO-2: a run stopped by ``train.exit_interval`` at step 5 (its checkpoint is the one to resume),
    shared by the same-layout and the 2-ranks-to-1 resume."""
    run = tmp_path_factory.mktemp("zero2") / "cut"
    first = train(run, prepared, extra=[*layout_args(dp=2, zero=2), "train.exit_interval=5"], expect=EXIT_REQUEUE)
    assert first["steps"] == 5 and len(first["losses"]) == 5
    return run


def test_resume_on_the_same_layout_is_bitwise_exact(prepared, tmp_path, zero2_cut):
    lay = layout_args(dp=2, zero=2)
    full = train(tmp_path / "full", prepared, extra=lay)
    first = json.loads((zero2_cut / "train_result.json").read_text())
    assert first["losses"] == full["losses"][:5]
    cut = copy_run(zero2_cut, tmp_path / "cut")
    second = train(cut, prepared, extra=lay)
    assert second["resumed_from"].endswith("step_00000005") and second["start_step"] == 5
    assert second["losses"] == full["losses"][5:]  # bitwise: fp32 on CPU
    assert second["val"] == full["val"]  # validation history is part of the state
    state = json.loads((cut / "checkpoints" / "step_00000010" / "trainer.json").read_text())
    assert state["loader"]["position"] == 10 * 8 and state["schedule"]["last_step"] == 10
    assert state["trainer"]["tokens_seen"] == 10 * 8 * 64
    keys = []  # weights, AdamW moments and every rank's RNG states at step 10: bitwise the same
    for sub in ("model", "rng"):
        files = sorted((tmp_path / "full" / "checkpoints" / "step_00000010" / sub).glob("*.safetensors"))
        assert [f.name for f in files] == {"model": ["tp0_pp0_dp0.safetensors", "tp0_pp0_dp1.safetensors"],
                                           "rng": ["rank00000.safetensors", "rank00001.safetensors"]}[sub]  # fmt: skip
        for f in files:
            keys += assert_same_tensors(f, cut / "checkpoints" / "step_00000010" / sub / f.name)
    assert {k.split("/")[0] for k in keys} >= {"param", "exp_avg", "exp_avg_sq", "torch"}
    # each DP rank wrote its ZeRO-2 partition: half of the elements of the weights and moments (alignment aside)
    model = cut / "checkpoints" / "step_00000010" / "model"
    elements = [sum(t.numel() for t in load_file(str(model / f"tp0_pp0_dp{d}.safetensors")).values()) for d in (0, 1)]
    assert abs(elements[0] - elements[1]) <= 0.01 * sum(elements) and sum(elements) % 3 == 0  # param + 2 moments
    # the resuming rank 0 read its own file (and its chunk sums), not its neighbour's
    assert second["checkpoint_read_bytes"] <= 1.1 * (model.parent.parent / "step_00000005" / "model"
                                                     / "tp0_pp0_dp0.safetensors").stat().st_size  # fmt: skip


def test_a_bf16_rnn_run_resumes_bitwise(prepared, tmp_path):
    """bf16 (ZeRO-1) and a recurrent model in one run: both resume exactly, losses and final weights."""
    extra = ["model.arch=gru", "model.num_layers=2", "train.precision=bf16", "parallel.zero_stage=1"]
    full = train(tmp_path / "full", prepared, steps=4, extra=extra)
    first = train(tmp_path / "cut", prepared, steps=4, extra=[*extra, "train.exit_interval=2"], expect=EXIT_REQUEUE)
    second = train(tmp_path / "cut", prepared, steps=4, extra=extra)
    assert second["start_step"] == 2 and len(first["losses"]) == len(second["losses"]) == 2
    assert first["losses"] + second["losses"] == full["losses"]
    final = sorted((tmp_path / "full" / "checkpoints" / "step_00000004" / "model").glob("*.safetensors"))
    assert len(final) == 1  # one rank: the model file holds every weight (and ZeRO-1's fp32 master copy)
    assert_same_tensors(final[0], tmp_path / "cut" / "checkpoints" / "step_00000004" / "model" / final[0].name)


@pytest.mark.parametrize(
    "before, after",
    [
        ((2, 1, 1, 1), (1, 1, 2, 1)),  # TP=2 -> DP=2
        ((1, 2, 1, 0), (1, 1, 1, 0)),  # PP=2 -> PP=1
        ((1, 1, 2, 3), (1, 1, 2, 1)),  # ZeRO-3 -> ZeRO-1
        ((1, 1, 2, 2), (1, 1, 1, 0)),  # 2 ranks -> 1
        ((1, 1, 1, 0), (2, 2, 1, 1)),  # 1 rank -> TP=2 x PP=2
    ],
    ids=lambda lay: "tp{}pp{}dp{}z{}".format(*lay),
)
def test_resume_onto_another_layout_continues_the_losses(before, after, prepared, tmp_path, uninterrupted, request):
    run = tmp_path / "run"
    if before == (1, 1, 2, 2):
        copy_run(request.getfixturevalue("zero2_cut"), run)
    elif before == (1, 1, 1, 0):  # the one-rank reference run, as it was at step 5
        copy_run(request.getfixturevalue("full_run"), run)
        shutil.rmtree(run / "checkpoints" / "step_00000010")
        (run / "checkpoints" / "latest").write_text("step_00000005\n")
    else:
        train(run, prepared, extra=[*layout_args(*before), "train.exit_interval=5"], expect=EXIT_REQUEUE)
    resumed = train(run, prepared, extra=layout_args(*after))
    assert resumed["start_step"] == 5
    assert_losses_close(resumed["losses"], uninterrupted["losses"][5:], 1e-6)
    state = json.loads((run / "checkpoints" / "step_00000010" / "trainer.json").read_text())
    assert state["loader"]["position"] == 80  # the global data position carried over


def test_corrupt_or_partial_checkpoints_are_skipped_and_named(prepared, full_run, tmp_path, capsys):
    run = copy_run(full_run, tmp_path / "run")
    root = run / "checkpoints"
    newest = root / "step_00000010"
    model = newest / "model" / "tp0_pp0_dp0.safetensors"
    flip_byte(model)
    assert any("sha256 does not match" in p and model.name in p for p in verify_checkpoint(newest))
    (root / "step_00000020.tmp").mkdir()  # an interrupted save
    (root / "step_00000015").mkdir()  # a folder without a manifest
    cfg = validate_config({"checkpoint": {"dir": str(root)}})
    # the cheap check before a resume (no re-hash of model files) passes over the partial ones, naming them
    assert CheckpointManager(cfg, layout=None)._choose() == str(newest)
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000015" in err and "step_00000010" not in err
    r = train(run, prepared, steps=12, extra=[f"checkpoint.resume={newest}"], expect=EXIT_INTEGRITY)
    assert (
        "checkpoint.resume=" in r["stderr"] and model.name in r["stderr"] and "do not match their sha256" in r["stderr"]
    )
    cli = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "checkpoint", "verify", str(newest)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == EXIT_INTEGRITY and model.name in cli.stdout
    # resume=auto: the rank that reads the flipped byte finds it; step 10 is named and step 5 resumes
    r, resumed = shardforge_train(run, prepared, *_overrides(12, []))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping checkpoint {newest}" in r.stderr and model.name in r.stderr
    assert resumed["resumed_from"] == str(root / "step_00000005") and resumed["start_step"] == 5


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damaged", ["trainer.json", "rng/rank00000.safetensors", "manifest.json", "model/tp0_pp0_dp0.sums.json"]
)
def test_a_damaged_state_file_or_manifest_makes_its_checkpoint_skipped_and_named(full_run, tmp_path, capsys, damaged):
    root = copy_run(full_run, tmp_path / "run") / "checkpoints"
    newest = root / "step_00000010"
    if damaged == "manifest.json":
        (newest / damaged).write_text('{"format": "shardforge-checkpoint/1", "files": ')  # cut short
    else:
        flip_byte(newest / damaged)
    chosen = CheckpointManager(validate_config({"checkpoint": {"dir": str(root)}}), layout=None)._choose()
    assert chosen == str(root / "step_00000005")
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}" in err and Path(damaged).name in err


def test_when_every_checkpoint_is_damaged_resume_refuses_unless_told_to_start_fresh(prepared, full_run, tmp_path):
    run = copy_run(full_run, tmp_path / "run")
    for step in (5, 10):
        flip_byte(next((run / "checkpoints" / f"step_{step:08d}" / "model").glob("*.safetensors")))
    r = train(run, prepared, steps=12, expect=EXIT_INTEGRITY)
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: checkpoint.resume=auto: none of the 2 checkpoints") and "resume=none" in last
    assert "Traceback" not in r["stderr"] and not (run / "checkpoints" / "step_00000012").exists()
    assert all(verify_checkpoint(run / "checkpoints" / f"step_{s:08d}") for s in (5, 10))  # kept as they were
    fresh = train(run, prepared, steps=12, extra=["checkpoint.resume=none"])
    assert fresh["resumed_from"] is None and fresh["start_step"] == 0 and len(fresh["losses"]) == 12


def test_a_dangling_latest_is_named(full_run, tmp_path):
    root = copy_run(full_run, tmp_path / "run") / "checkpoints"
    (root / "latest").write_text("step_00000099\n")
    r = run_cli("checkpoint", "consolidate", str(root), str(tmp_path / "out"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == EXIT_INTEGRITY and len(lines) == 1 and "latest names 'step_00000099'" in lines[0]


def test_a_save_that_fails_leaves_the_previous_checkpoint_and_latest_intact(prepared, full_run, tmp_path):
    run = copy_run(full_run, tmp_path / "run")
    root = run / "checkpoints"
    (root / "step_00000015.tmp").write_text("a file where the save's folder would go")
    r = train(run, prepared, steps=15, expect=EXIT_USAGE)
    last = r["stderr"].strip().splitlines()[-1]
    assert last.startswith("error: the checkpoint of step 15 could not be written") and "Traceback" not in r["stderr"]
    assert (root / "latest").read_text().strip() == "step_00000010" and verify_checkpoint(root / "step_00000010") == []
    assert not (root / "step_00000015").exists()


def rewrite_state(ckpt: Path, change) -> None:
    """Edit a checkpoint's trainer.json and record it in the manifest again, as a run in that state would have."""
    state = json.loads((ckpt / "trainer.json").read_text())
    change(state)
    (ckpt / "trainer.json").write_text(json.dumps(state, indent=1))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "trainer.json").read_bytes()
    manifest["files"]["trainer.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_resuming_onto_other_data_is_refused(prepared, full_run, tmp_path):
    run = copy_run(full_run, tmp_path / "run")
    newest = run / "checkpoints" / "step_00000010"
    tokenizer_sha = hashlib.sha256((prepared / "tokenizer" / "tokenizer.model").read_bytes()).hexdigest()
    assert json.loads((newest / "trainer.json").read_text())["data_identity"] == {
        "tokenizer_sha256": tokenizer_sha, "sample_tokens": 65}  # fmt: skip
    rewrite_state(newest, lambda state: state["data_identity"].update(tokenizer_sha256="0" * 64))
    r = train(run, prepared, steps=12, expect=EXIT_USAGE)
    last = r["stderr"].strip().splitlines()[-1]
    assert f"was trained on data with tokenizer_sha256={'0' * 64}, this run's data has {tokenizer_sha}" in last
    assert "model.init_from=ckpt:" in last and "Traceback" not in r["stderr"]


def test_a_new_batch_size_on_resume_is_explained_and_the_data_position_carries_on(prepared, full_run, tmp_path):
    run = copy_run(full_run, tmp_path / "run")
    r, result = shardforge_train(run, prepared, *_overrides(12, ["train.global_batch_size=16"]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: train.global_batch_size 8 -> 16 since the checkpoint: the data position (80 samples)" in r.stdout
    assert result["start_step"] == 10 and len(result["losses"]) == 2
    state = json.loads((run / "checkpoints" / "step_00000012" / "trainer.json").read_text())
    assert state["loader"]["position"] == 80 + 2 * 16


def test_a_checkpoint_of_another_model_shape_is_refused(prepared, full_run, tmp_path):
    run = copy_run(full_run, tmp_path / "run")
    r = train(run, prepared, steps=15, extra=["model.ffn_hidden_size=192"], expect=EXIT_INTEGRITY)
    assert "does not fit this model" in r["stderr"] and "linear_fc1.weight" in r["stderr"]


def test_retention_keeps_the_last_k_and_every_mth(prepared, tmp_path):
    run = tmp_path / "run"
    train(run, prepared, steps=20, extra=["checkpoint.keep_last=2", "checkpoint.keep_every=10"])
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "step_00000010", "step_00000015", "step_00000020"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000020"


def start_logged(run: Path, prepared: Path, steps: int, extra=()) -> subprocess.Popen:
    cmd = args_for(run, prepared, steps, ["logging.log_interval=1", *extra])
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip


def signal_at_step(proc: subprocess.Popen, step: int, *signals: signal.Signals) -> int:
    """Send ``signals`` (back to back) to `shardforge train` once its log shows ``step``; return its exit code."""
    for line in proc.stdout:
        if line.startswith("step") and "/" in line.split()[1] and int(line.split()[1].split("/")[0]) >= step:
            for sig in signals:
                proc.send_signal(sig)
            break
    proc.stdout.read()
    return proc.wait(timeout=300)


DP2 = ["checkpoint.interval=4", "train.eval_interval=1000", "logging.log_interval=1", *layout_args(dp=2, zero=1)]
DP2_STEPS = 24


@pytest.fixture(scope="module")
def dp2_reference(prepared, tmp_path_factory) -> tuple[Path, float]:
    """An uninterrupted 2-rank ZeRO-1 run of 24 steps (a checkpoint every 4): the reference of the SIGTERM and the
    fault-injection tests. Returns its folder and its start-up time (start until the first step's log line)."""
    run = tmp_path_factory.mktemp("dp2") / "reference"
    started, first_step = time.monotonic(), None
    proc = subprocess.Popen(args_for(run, prepared, DP2_STEPS, DP2), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    for line in proc.stdout:
        if first_step is None and line.startswith("step "):
            first_step = time.monotonic() - started
    assert proc.wait(timeout=600) == 0 and first_step is not None
    return run, first_step


def test_sigterm_to_a_multi_rank_run_checkpoints_exits_with_the_requeue_code_and_resumes(
    prepared, tmp_path, dp2_reference
):
    run = tmp_path / "run"
    assert signal_at_step(start_logged(run, prepared, DP2_STEPS, DP2), 7, signal.SIGTERM) == EXIT_REQUEUE
    full = json.loads((dp2_reference[0] / "train_result.json").read_text())
    first = json.loads((run / "train_result.json").read_text())
    assert first["preempted"] and "preempted" in first["stop_reason"] and first["steps"] >= 7
    cut = first["steps"]
    assert verify_checkpoint(run / "checkpoints" / f"step_{cut:08d}") == []
    second = train(run, prepared, steps=DP2_STEPS, extra=DP2)
    assert second["start_step"] == cut and len(full["losses"]) == DP2_STEPS
    assert first["losses"] + second["losses"] == full["losses"]


def test_ctrl_c_then_a_second_signal_during_the_save_still_checkpoints(prepared, tmp_path, uninterrupted):
    """SIGINT (Ctrl-C) saves and stops like SIGTERM; a SIGTERM right behind it (during the step or the save)
    changes nothing. The resumed run continues the uninterrupted one's losses exactly."""
    run = tmp_path / "run"
    assert signal_at_step(start_logged(run, prepared, 10), 3, signal.SIGINT, signal.SIGTERM) == EXIT_REQUEUE
    first = json.loads((run / "train_result.json").read_text())
    cut = first["steps"]
    assert first["preempted"] and 3 <= cut < 10 and verify_checkpoint(run / "checkpoints" / f"step_{cut:08d}") == []
    second = train(run, prepared, steps=10)
    assert second["start_step"] == cut and first["losses"] + second["losses"] == uninterrupted["losses"]


def _catches(pid: int, sig: signal.Signals) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


def test_a_signal_during_start_up_is_kept_and_acted_on_at_the_first_step(prepared, tmp_path):
    """SIGTERM as soon as the rank has its handler (the first thing it does, long before torch is imported):
    the rank starts up, trains one step, saves it and exits 75."""
    import psutil

    run = tmp_path / "run"
    proc = start_logged(run, prepared, 10)
    rank = None
    while rank is None and proc.poll() is None:
        kids = [c for c in psutil.Process(proc.pid).children() if "launcher.train" in " ".join(c.cmdline())]
        rank = kids[0].pid if kids and _catches(kids[0].pid, signal.SIGTERM) else None
    os.kill(rank, signal.SIGTERM)  # to the rank itself: it is known to catch it now
    output = proc.stdout.read()
    assert proc.wait(timeout=300) == EXIT_REQUEUE
    first = json.loads((run / "train_result.json").read_text())
    assert first["steps"] == 1 and "step      1/10" in output and "step      2/10" not in output
    assert verify_checkpoint(run / "checkpoints" / "step_00000001") == []


def _kill_random_rank(proc: subprocess.Popen, rng: random.Random) -> str:
    """SIGKILL one random training rank of a running job (the spawner tears the others down), or the whole job
    while no rank runs yet (or any more)."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
        ranks = [c for c in procs if "launcher.train" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        ranks = []
    if ranks:
        victim = rng.choice(ranks)
        victim.kill()
        what = "rank"
    else:
        what = "job"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # reap anything left in the job's process group
    except ProcessLookupError:
        pass
    return what


def newest_complete_checkpoint(root: Path) -> int | None:
    """The test's own check, independent of the manager: the newest step folder whose manifest lists every file
    with its size and sha256."""
    import hashlib

    best = None
    for d in sorted(root.glob("step_*")) if root.exists() else []:
        if not d.name[5:].isdigit():
            continue  # an interrupted save (step_N.tmp)
        try:
            files = json.loads((d / "manifest.json").read_text())["files"]
        except (OSError, ValueError, KeyError):
            continue
        ok = all((d / rel).is_file() and hashlib.sha256((d / rel).read_bytes()).hexdigest() == meta["sha256"]
                 for rel, meta in files.items())  # fmt: skip
        if ok:
            best = int(d.name[5:])
    return best


def logged_steps(text: str) -> tuple[int | None, int]:
    """From a round's log: the step it started at (None before it chose a checkpoint or a fresh start) and the
    last step it logged."""
    resumed = re.search(r"resumed from \S*step_\d+ at step (\d+)", text)
    start = int(resumed.group(1)) if resumed else (0 if "training gpt on" in text else None)
    steps = [int(n) for n in re.findall(r"^step\s+(\d+)/", text, re.M)]
    return start, max(steps, default=-1)


def wait_for_log(proc: subprocess.Popen, log: Path, ready) -> None:
    """Poll the round's log until ``ready(text)`` or the job ends."""
    while proc.poll() is None and not ready(log.read_text()):
        time.sleep(0.02)


def test_fault_injection_kill_9_at_random_moments(prepared, tmp_path, dp2_reference):
    """4 rounds: kill -9 a random rank of a 2-rank job at a random moment (every third round during start-up or
    checkpoint loading, the others 5 to 9 steps after the round's start, a random 0-0.3 s into the step or the save
    that follows), then start again with resume=auto. Round by round the next start resumes from the newest
    checkpoint that is complete on disk (checked here by hashing, not by the manager), or starts fresh when there
    is none; `latest` never names an incomplete checkpoint; the final weights equal the uninterrupted run's."""
    reference, first_step = dp2_reference
    steps, extra = DP2_STEPS, DP2
    run, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    rng = random.Random(7)
    expected, seen, victims = [], [], []
    for i in range(4):
        expected.append(newest_complete_checkpoint(root))
        log = tmp_path / f"round{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(args_for(run, prepared, steps, extra), cwd=REPO, env=ENV, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        if i % 3 == 0:  # during start-up, or while the checkpoint loads
            try:
                proc.wait(timeout=rng.uniform(0, first_step))
            except subprocess.TimeoutExpired:
                pass
        else:  # while steps and saves run: not timed, counted in logged steps
            k = rng.randint(5, 9)  # at least one checkpoint boundary (every 4) is passed and its save finished

            def ready(text: str, k=k) -> bool:
                start, last = logged_steps(text)
                return start is not None and last >= start + k

            wait_for_log(proc, log, ready)
            time.sleep(rng.uniform(0, 0.3))
        victims.append(_kill_random_rank(proc, rng) if proc.returncode is None else "finished")
        start, _ = logged_steps(log.read_text())
        resumed = re.search(r"resumed from \S*step_(\d+) at step", log.read_text())
        seen.append(int(resumed.group(1)) if resumed else ("fresh" if start == 0 else "unknown"))
        if (root / "latest").exists():
            target = (root / "latest").read_text().strip()
            assert newest_complete_checkpoint(root) is not None and verify_checkpoint(root / target) == [], target
    print(f"fault injection: kills {victims}; newest complete before each round {expected}; resumed from {seen}")
    assert len(seen) == len(expected) == 4
    for i, (want, got) in enumerate(zip(expected, seen)):
        if got != "unknown":  # "unknown": killed before it had chosen a checkpoint
            assert got == ("fresh" if want is None else want), f"round {i}: resumed {got}, newest complete {want}"
    assert sum(isinstance(g, int) for g in seen) >= 1  # round 2 resumes from round 1's checkpoints; the final too
    want = newest_complete_checkpoint(root)
    final = train(run, prepared, steps=steps, extra=extra)
    assert final["resumed_from"] == (None if want is None else str(root / f"step_{want:08d}"))
    assert final["steps"] == steps
    assert_same_model_state(reference, run)


def as_format_1(ckpt: Path) -> None:
    """Rewrite a one-rank format-2 checkpoint as an older Shardforge wrote it: one model file per TP x PP slice
    holding each key's whole slice, and a format-1 manifest."""
    from safetensors.torch import save_file

    from training.checkpoint import shards

    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    tensors = shards.full_tensors(ckpt, files, old_tp=1, gated=False, prefix="")
    for f in (ckpt / "model").iterdir():
        f.unlink()
    save_file(tensors, str(ckpt / "model" / "tp0_pp0.safetensors"), metadata={"tp": "1", "pp": "1"})
    entries = {}
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "manifest.json"):
        entries[str(f.relative_to(ckpt))] = {
            "bytes": f.stat().st_size,
            "sha256": hashlib.sha256(f.read_bytes()).hexdigest(),
        }
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps({**manifest, "format": "shardforge-checkpoint/1", "files": entries}))


def test_a_format_1_checkpoint_still_resumes_exactly(prepared, full_run, tmp_path, uninterrupted):
    run = copy_run(full_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    (run / "checkpoints" / "latest").write_text("step_00000005\n")
    as_format_1(run / "checkpoints" / "step_00000005")
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000005" / "model").iterdir()) == [
        "tp0_pp0.safetensors"
    ]
    resumed = train(run, prepared, steps=10)
    assert resumed["start_step"] == 5 and resumed["losses"] == uninterrupted["losses"][5:]
    assert json.loads((run / "checkpoints" / "step_00000010" / "manifest.json").read_text())["format"].endswith("/2")
