"""int8 quantization and pruning (with a recovery fine-tune) of the shared base model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import final_weights
from conftest import run_cli as cli
from safetensors.torch import load_file

MARGIN = 0.02  # stated: int8 perplexity within 2% of fp32 on the test split


LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


@pytest.fixture(scope="module")
def fp32_eval(base_model, tmp_path_factory) -> dict:
    """`shardforge eval` of the fp32 base model on the first 32 test samples, and its full weights."""
    out = tmp_path_factory.mktemp("fp32") / "ev.json"
    r = cli("eval", "--checkpoint", str(base_model / "checkpoints"), "--max-samples", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return {"perplexity": json.loads(out.read_text())["test"]["perplexity"], "weights": final_weights(base_model)}


@pytest.mark.parametrize("mode", ["dynamic", "weight-only"])
def test_int8_stores_int8_matrices_and_keeps_perplexity_within_the_margin(base_model, fp32_eval, tmp_path, mode):
    out = tmp_path / "int8"
    r = cli("quantize", "--checkpoint", str(base_model / "checkpoints"), "--out", str(out), "--mode", mode,
            "--max-samples", "32")  # fmt: skip
    assert r.returncode == 0, r.stderr
    stored = load_file(str(out / "model-int8.safetensors"))
    fp32 = fp32_eval["weights"]
    matrices = [f"{i + 1}.layer.{part}.weight" for i in range(4) for part in LINEARS]  # configs/tiny.yaml: 4 layers
    for name in matrices:
        assert stored[name].dtype == torch.int8 and stored[name].shape == fp32[name].shape, name
        scale = stored[name + ".scale"]
        assert scale.dtype == torch.float32 and scale.shape == (fp32[name].shape[0],), name
        assert (stored[name].float() * scale[:, None] - fp32[name]).abs().max() <= scale.max() / 2 + 1e-7, name
    fp32_bytes = sum(t.numel() * 4 for t in fp32.values())
    assert (out / "model-int8.safetensors").stat().st_size < 0.5 * fp32_bytes
    ev = cli("eval", "--checkpoint", str(out), "--max-samples", "32", "--out", str(tmp_path / "ev.json"))
    assert ev.returncode == 0, ev.stderr  # the int8 folder serves eval (and generate) directly
    int8_ppl = json.loads((tmp_path / "ev.json").read_text())["test"]["perplexity"]
    assert 1 - MARGIN <= int8_ppl / fp32_eval["perplexity"] <= 1 + MARGIN  # both measured by `shardforge eval`
    report = json.loads((out / "quantization.json").read_text())
    assert report["quantized"]["perplexity"] == pytest.approx(int8_ppl, rel=1e-6)


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
