"""Quantization, pruning with a recovery fine-tune, and continued training behind the regression gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TRAIN_ENV, final_weights, small_config, stdlib_files
from safetensors.torch import load_file

from data_pipeline.prepare import prepare_dataset
from launcher.errors import EXIT_GATE

ENV = {**os.environ, **TRAIN_ENV}
MARGIN = 0.02  # stated: int8 perplexity within 2% of fp32 on the test split


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_int8_perplexity_stays_within_the_margin(base_model, tmp_path, mode):
    out = tmp_path / "int8"
    ck = str(base_model / "checkpoints")
    r = cli("quantize", "--checkpoint", ck, "--out", str(out), "--mode", mode, "--max-samples", "32")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "quantization.json").read_text())
    assert rep["perplexity_ratio"] <= 1 + MARGIN and rep["int8_file_bytes"] < 0.5 * rep["fp32_bytes"]
    ev = cli("eval", "--checkpoint", str(out), "--max-samples", "32", "--out", str(tmp_path / "ev.json"))
    assert ev.returncode == 0, ev.stderr  # the int8 folder serves eval (and generate) directly
    got = json.loads((tmp_path / "ev.json").read_text())["test"]["perplexity"]
    assert got == pytest.approx(rep["quantized"]["perplexity"], rel=1e-6)


def test_pruning_n_m_and_unstructured_then_recovery_keeps_the_zeros(base_model, prepared, tmp_path):
    ck = str(base_model / "checkpoints")
    r = cli("prune", "--checkpoint", ck, "--out", str(tmp_path / "p24"), "--nm", "2:4", "--max-samples", "32")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "p24" / "pruning.json").read_text())
    w = load_file(str(tmp_path / "p24" / "model.safetensors"))
    fc1 = w["1.layer.mlp.linear_fc1.weight"]
    assert ((fc1.reshape(fc1.shape[0], -1, 4) != 0).sum(-1) <= 2).all() and rep["sparsity"] == 0.5
    assert rep["perplexity_after"] > rep["perplexity_before"]
    r = cli("prune", "--checkpoint", ck, "--out", str(tmp_path / "p30"), "--sparsity", "0.3", "--max-samples", "8")
    assert (
        r.returncode == 0 and abs(json.loads((tmp_path / "p30" / "pruning.json").read_text())["sparsity"] - 0.3) < 1e-3
    )
    run = tmp_path / "recover"
    r = cli("finetune", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.output_dir={prepared}",
            f"model.init_from=ckpt:{tmp_path / 'p24'}", "train.keep_sparsity=true", "train.max_steps=15",
            "train.eval_interval=15", "optim.warmup_steps=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    after = final_weights(run)
    for name in ("1.layer.mlp.linear_fc1.weight", "3.layer.self_attention.linear_qkv.weight"):
        assert torch.equal(after[name] == 0, w[name] == 0)  # the zeros survived 15 AdamW steps, nothing else is 0
    ev = cli("eval", "--checkpoint", str(run / "checkpoints"), "--max-samples", "32", "--out", str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["test"]["perplexity"] < rep["perplexity_after"], ev.stderr


@pytest.fixture(scope="module")
def new_data(prepared, tmp_path_factory):
    """Newer documents, tokenized with the released model's tokenizer."""
    tmp = tmp_path_factory.mktemp("new")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for f in stdlib_files(120)[60:]:
        (corpus / f.name).write_text(f.read_text())
    cfg = small_config(tmp, [str(corpus)], tokenizer={"model_file": str(prepared / "tokenizer" / "tokenizer.model")})
    return prepare_dataset(cfg).output_dir


def _continue(run, new_data, base_model, *extra):
    return cli("continue", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.output_dir={new_data}",
               f"maintain.previous={base_model / 'checkpoints'}", "maintain.replay_fraction=0.3",
               "maintain.eval_max_samples=32", "train.max_steps=20", "train.eval_interval=20", *extra)  # fmt: skip


def test_gate_promotes_a_better_model_and_refuses_a_worse_one(base_model, new_data, tmp_path):
    good = _continue(tmp_path / "good", new_data, base_model)
    assert good.returncode == 0, good.stderr[-3000:]
    [entry] = [json.loads(line) for line in (tmp_path / "good" / "registry.jsonl").read_text().splitlines()]
    assert entry["promoted"] and entry["metrics"]["loss"] < entry["metrics"]["previous_loss"]
    assert entry["parent"].endswith("step_00000040") and len(entry["data_manifest_sha256"]) == 64
    assert entry["config"]["loader"]["blend"][1]["weight"] == pytest.approx(0.3) and "PROMOTED" in good.stdout
    bad = _continue(tmp_path / "bad", new_data, base_model, "optim.lr=1.0")  # deliberately worse
    assert bad.returncode == EXIT_GATE and "REFUSED" in bad.stdout
    decision = json.loads((tmp_path / "bad" / "gate.json").read_text())
    assert not decision["promoted"] and decision["metrics"]["loss"] > decision["metrics"]["limit"]
    assert not (tmp_path / "bad" / "registry.jsonl").exists()
