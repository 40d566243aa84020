"""`make quickstart` as a newcomer runs it (the same driver, on the suite's prepared dataset and with fewer steps):
it trains, survives a SIGTERM, resumes bitwise, evaluates, generates and exports, with no third-party notices."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, TRAIN_ENV


def test_quickstart_runs_the_whole_pipeline_quietly(prepared, tmp_path):
    run = tmp_path / "qs"
    over = [f"run_dir={run}", "data.seq_length=64", "parallel.nproc=1", "train.max_steps=12", "checkpoint.interval=4",
            "train.eval_interval=6", "train.micro_batch_size=4", "train.global_batch_size=8"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "launcher.quickstart", "--data", str(prepared), *over], cwd=REPO,
                       env={**os.environ, **TRAIN_ENV}, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "sending SIGTERM at step" in r.stdout and "resume check: steps 1-12 (SIGTERM at step" in r.stdout
    assert "MATCH (bitwise)" in r.stdout and "bits per byte" in r.stdout
    assert (run / "hf" / "model.safetensors").is_file() and list((run / "eval").glob("eval_step_*.json"))
    noise = [line for line in (r.stdout + r.stderr).splitlines() if "Warning" in line or "warnings.warn" in line]
    assert noise == []
