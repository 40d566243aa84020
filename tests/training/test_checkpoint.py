"""Checkpoints on real ranks: exact resume, resume onto other layouts, corruption, signals, fault injection."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAIN_ENV, final_weights, layout_args, shardforge_train, train_command

from launcher.config import validate_config
from launcher.errors import EXIT_INTEGRITY, EXIT_REQUEUE
from training.checkpoint import CheckpointManager, verify_checkpoint

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


def test_resume_on_the_same_layout_is_bitwise_exact(prepared, tmp_path):
    lay = layout_args(dp=2, zero=2)
    full = train(tmp_path / "full", prepared, extra=lay)
    first = train(tmp_path / "cut", prepared, extra=[*lay, "train.exit_interval=5"], expect=EXIT_REQUEUE)
    assert first["steps"] == 5 and first["losses"] == full["losses"][:5]
    second = train(tmp_path / "cut", prepared, extra=lay)
    assert second["resumed_from"].endswith("step_00000005") and second["start_step"] == 5
    assert second["losses"] == full["losses"][5:]  # bitwise: fp32 on CPU
    assert second["val"] == full["val"]  # validation history is part of the state
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000010" / "trainer.json").read_text())
    assert state["loader"]["position"] == 10 * 8 and state["schedule"]["last_step"] == 10
    assert state["trainer"]["tokens_seen"] == 10 * 8 * 64


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
def test_resume_onto_another_layout_continues_the_losses(before, after, prepared, tmp_path, uninterrupted):
    run = tmp_path / "run"
    train(run, prepared, extra=[*layout_args(*before), "train.exit_interval=5"], expect=EXIT_REQUEUE)
    resumed = train(run, prepared, extra=layout_args(*after))
    assert resumed["start_step"] == 5
    for a, b in zip(resumed["losses"], uninterrupted["losses"][5:]):
        assert abs(a - b) / abs(b) < 1e-6, (resumed["losses"], uninterrupted["losses"][5:])
    state = json.loads((run / "checkpoints" / "step_00000010" / "trainer.json").read_text())
    assert state["loader"]["position"] == 80  # the global data position carried over


def test_corrupt_or_partial_checkpoints_are_skipped_and_named(prepared, full_run, tmp_path, capsys):
    run = copy_run(full_run, tmp_path / "run")
    root = run / "checkpoints"
    newest = root / "step_00000010"
    model = next((newest / "model").glob("*.safetensors"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    assert any("sha256 does not match" in p and model.name in p for p in verify_checkpoint(newest))
    (root / "step_00000020.tmp").mkdir()  # an interrupted save
    (root / "step_00000015").mkdir()  # a folder without a manifest
    cfg = validate_config({"checkpoint": {"dir": str(root)}})
    chosen = CheckpointManager(cfg, layout=None)._choose()
    assert chosen == str(root / "step_00000005")
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "step_00000010" in err and "step_00000015" in err
    r = train(run, prepared, steps=12, extra=[f"checkpoint.resume={newest}"], expect=EXIT_INTEGRITY)
    assert "checkpoint.resume=" in r["stderr"] and "sha256 does not match" in r["stderr"]
    cli = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "checkpoint", "verify", str(newest)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert cli.returncode == EXIT_INTEGRITY and model.name in cli.stdout


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


def test_sigterm_checkpoints_exits_with_the_requeue_code_and_resumes(prepared, tmp_path):
    run = tmp_path / "run"
    steps = 40
    reference = subprocess.Popen(  # one rank each: the uninterrupted reference runs beside the interrupted run
        args_for(tmp_path / "full", prepared, steps, ["logging.log_interval=1"]), cwd=REPO, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proc = subprocess.Popen(
        args_for(run, prepared, steps, ["logging.log_interval=1"]),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("step") and "/40" in line and int(line.split()[1].split("/")[0]) >= 7:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=300) == EXIT_REQUEUE and reference.wait(timeout=300) == 0
    full = json.loads((tmp_path / "full" / "train_result.json").read_text())
    first = json.loads((run / "train_result.json").read_text())
    assert first["preempted"] and "preempted" in first["stop_reason"]
    cut = first["steps"]
    assert (run / "checkpoints" / f"step_{cut:08d}" / "manifest.json").is_file()
    second = train(run, prepared, steps=steps, extra=["logging.log_interval=1"])
    assert second["start_step"] == cut and first["losses"] + second["losses"] == full["losses"]


def _kill_random_rank(proc: subprocess.Popen, rng: random.Random) -> str:
    """SIGKILL one random training rank of a running job (the spawner tears the others down), else the whole job."""
    import psutil

    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
        ranks = [
            c
            for c in procs
            if "launcher.train" in " ".join(c.cmdline()) and "torch.distributed.run" not in " ".join(c.cmdline())
        ]
    except psutil.NoSuchProcess:
        ranks = []
    if ranks:
        victim = rng.choice(ranks)
        victim.kill()
        what = f"rank pid {victim.pid}"
    else:
        what = "the launcher (no rank running)"
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


def test_fault_injection_kill_9_at_random_moments(prepared, tmp_path):
    """10 rounds: kill -9 a random rank of a 2-rank job at a random moment of training (a step, a save); restart
    with resume=auto. Every round resumes from a verified checkpoint, `latest` never points at an incomplete
    one, and the final weights equal the uninterrupted run's."""
    steps = 120
    extra = ["checkpoint.interval=4", "train.eval_interval=1000", *layout_args(dp=2, zero=1)]
    ref = tmp_path / "ref"
    train(ref, prepared, steps=steps, extra=extra)
    run = tmp_path / "run"
    rng = random.Random(7)
    resumed_rounds, partial_seen, victims = 0, 0, []
    for i in range(10):
        log = tmp_path / f"round{i}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                args_for(run, prepared, steps, extra),
                cwd=REPO,
                env=ENV,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # kill at a random moment once this round trains (start-up time varies with the machine's load)
        deadline = time.time() + 120
        while proc.poll() is None and "step " not in log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 1.5))
        victims.append(_kill_random_rank(proc, rng))
        root = run / "checkpoints"
        partial_seen += len(list(root.glob("*.tmp"))) if root.exists() else 0
        latest = root / "latest"
        if latest.exists():
            target = root / latest.read_text().strip()
            assert verify_checkpoint(target) == [], target
            resumed_rounds += 1
    final = train(run, prepared, steps=steps, extra=extra)
    killed_ranks = sum(v.startswith("rank") for v in victims)
    print(
        f"fault injection: 10 kill -9 rounds ({killed_ranks} of one rank, the rest after the run had ended), "
        f"{resumed_rounds} left a verified `latest` to resume from, {partial_seen} interrupted saves seen"
    )
    assert final["steps"] == steps and resumed_rounds >= 7 and killed_ranks >= 8
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
