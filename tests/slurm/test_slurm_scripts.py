"""Generated batch scripts: a 64-GPU layout line by line, hostile values quoted, bad values refused."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from core.config import load_config
from core.errors import ConfigError
from launcher.slurm import prepare_job, render


def script_for(*overrides: str, config: str = "configs/llama-7b.yaml") -> str:
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "slurm", "script", "-c", config, *overrides],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_64_gpu_script_line_by_line(tmp_path):
    """8 nodes x 8 GPUs, TP=8, PP=2, DP=4: one task per GPU, every directive and the launch line as expected."""
    run = tmp_path / "llama"
    text = script_for(
        f"run_dir={run}", "parallel.nproc=64", "parallel.tp=8", "parallel.pp=2", "model.num_layers=32",
        "slurm.partition=gpu", "slurm.account=proj-42", "slurm.qos=high", "--nodes", "8", "--gpus-per-node", "8",
        "--time", "2-00:00:00",
    )  # fmt: skip
    lines = text.splitlines()
    directives = [ln for ln in lines if ln.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=shardforge",
        "#SBATCH --nodes=8",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={REPO}",
        f"#SBATCH --output={run}/slurm/train-%j.out",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj-42",
        "#SBATCH --qos=high",
    ]
    assert lines[0] == "#!/bin/bash"
    assert f"RUN_DIR={run}" in lines and f"CONFIG={run}/slurm/config.yaml" in lines
    assert f"PYTHON={sys.executable}" in lines and "MAX_RESTARTS=10" in lines and "REQUEUE=1" in lines
    assert "LAUNCH=srun" in lines
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert (
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))   # from the job id: jobs sharing a host never collide"
        in lines
    )
    assert (
        '  srun --kill-on-bad-exit=0 --wait=60 --label --cpu-bind=cores "$PYTHON" -m launcher.train -c "$CONFIG" \\'
        in lines
    )
    assert f"CKPT_DIR={run}/checkpoints" in lines
    assert '  scontrol requeue "$SLURM_JOB_ID" || {' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    # the job runs the frozen config (written at submit): the same layout
    assert "#SBATCH --ntasks-per-node=1" in script_for(
        f"run_dir={run}", "parallel.nproc=64", "parallel.tp=8", "parallel.pp=2", "model.num_layers=32",
        "--nodes", "8", "--gpus-per-node", "8", "--launch", "torchrun",
    )  # fmt: skip


def _bash_value(text: str, name: str) -> str:
    """What bash assigns to ``name`` in the script (evaluated by bash itself, with nothing else run)."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{name}="))
    r = subprocess.run(["bash", "-c", f'{line}\nprintf %s "${name}"'], capture_output=True, text=True, check=True)
    return r.stdout


def test_hostile_values_come_out_quoted_and_harmless(tmp_path):
    marker = tmp_path / "pwned"
    name = f"a\"b'c; touch {marker} #`touch {marker}`$(touch {marker})"
    run = tmp_path / f"dir with spaces;$(touch {marker.name}) 'q' \"d\" #"
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run_dir={run}"])
    cfg.slurm.job_name = name
    text = render(prepare_job(cfg))
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert _bash_value(text, "RUN_DIR") == str(run)
    assert _bash_value(text, "CONFIG") == f"{run}/slurm/config.yaml"
    directive = next(ln for ln in text.splitlines() if ln.startswith("#SBATCH --job-name="))
    assert shlex.split(directive.split("=", 1)[1]) == [name]  # sbatch reads #SBATCH values with these rules
    assert not marker.exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("slurm.job_name=bad\\name", "slurm.job_name"),
        ("slurm.partition=gpu;rm", "slurm.partition"),
        ("slurm.time=tomorrow", "slurm.time"),
        ("slurm.time=2", "slurm.signal_grace_s=120"),  # the warning could come before the ranks start
        ("slurm.nodes=3", "parallel.nproc=4"),
        ("slurm.env={'BAD-NAME': 'x'}", "slurm.env"),
    ],
)
def test_bad_slurm_values_are_refused_naming_the_key(override, key, tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml", [f"run_dir={tmp_path}", "parallel.nproc=4", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        prepare_job(cfg)
    assert not (Path(tmp_path) / "slurm").exists()
