"""The effort planner: exact parameter counts, hand-checked memory figures, layouts that cannot fit."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO

from core.config import load_config, validate_config
from launcher.planner import GIB, CandidateLayout, memory, plan_layout, search
from training.model.flops import gpt_parameter_count

SMALL = [
    {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4},
    {"num_layers": 3, "hidden_size": 96, "num_attention_heads": 6, "num_query_groups": 2, "ffn_hidden_size": 200},
    {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "activation": "gelu",
        "normalization": "LayerNorm",
        "position_embedding": "learned",
    },
    {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "tie_embeddings": True},
    {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "bias": True},
    {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "activation": "gelu_tanh", "bias": True},
]

COUNT = """
import json, sys
from core.config import ModelConfig
from parallelism.layout import init_distributed, shutdown
from core.config import ParallelConfig
from training.model.gpt import gpt_layer_specs, build_sequential
init_distributed(ParallelConfig())
out = []
for spec in json.loads(sys.argv[1]):
    m = ModelConfig(**spec)
    model = build_sequential(gpt_layer_specs(m, 1000, 128, 1), m.tie_embeddings)
    out.append(sum(p.numel() for p in model.parameters()))
print(json.dumps(out))
shutdown()
"""


def test_parameter_count_equals_the_built_model():
    from core.config import ModelConfig

    r = subprocess.run(
        [sys.executable, "-c", COUNT, json.dumps(SMALL)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    built = json.loads(r.stdout.strip().splitlines()[-1])
    assert built == [gpt_parameter_count(ModelConfig(**s), 1000, 128) for s in SMALL]


def test_public_model_sizes():
    for name, n in (("llama-7b", 6_738_415_616), ("llama-70b", 68_976_648_192), ("llama-1b", 1_100_048_384)):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert gpt_parameter_count(cfg.model, 32000, cfg.data.seq_length) == n


def test_7b_memory_matches_the_hand_calculation():
    cfg = load_config(REPO / "configs" / "llama-7b.yaml")
    n = 6_738_415_616
    plain = memory(cfg, 32000, CandidateLayout(1, 1, 1, 0, 1, "selective"))
    assert (plain.weights, plain.gradients, plain.optimizer) == (2 * n, 2 * n, 12 * n)  # bf16 + fp32 master + Adam
    z1 = memory(cfg, 32000, CandidateLayout(1, 1, 8, 1, 1, "selective"))
    assert (z1.weights, z1.gradients, z1.optimizer) == (2 * n, 2 * n, 12 * n / 8)
    z3 = memory(cfg, 32000, CandidateLayout(1, 1, 8, 3, 1, "selective"))
    assert (z3.weights, z3.gradients, z3.optimizer) == (2 * n / 8, 2 * n / 8, 12 * n / 8)
    # activations, hand-computed: s*b*h*(10 + 24/tp) bytes per layer, 32 layers, SDPA stores no S x S matrix
    assert plain.activations == 4096 * 1 * 4096 * 34 * 32
    full = memory(cfg, 32000, CandidateLayout(1, 1, 8, 1, 1, "full"))
    assert full.activations == 2 * 4096 * 4096 * 32


def test_layouts_that_cannot_fit_say_why():
    cfg = load_config(REPO / "configs" / "llama-70b.yaml")
    plan = plan_layout(cfg, 32000, CandidateLayout(8, 1, 1, 0, 1, "none"), "h100", 8, 0.4)
    assert any(p.startswith("needs") and "of 80 GiB" in p for p in plan.problems)
    assert plan.memory.total > 80 * GIB
    fits, rejected = search(cfg, 32000, "h100", 8, 0.4)
    assert fits == [] and rejected["does not fit in memory"] > 0
    bad = plan_layout(cfg, 32000, CandidateLayout(3, 1, 1, 0, 1, "none"), "h100", 3, 0.4)
    assert "heads not divisible by tp" in bad.problems


def test_search_orders_fitting_layouts_fastest_first():
    cfg = validate_config(
        {
            "model": {"num_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "ffn_hidden_size": 11008},
            "data": {"seq_length": 4096},
            "train": {"global_batch_size": 256, "micro_batch_size": 1},
        }
    )
    fits, _ = search(cfg, 32000, "h100", 8, 0.4)
    assert fits and all(a.step_s <= b.step_s for a, b in zip(fits, fits[1:]))
    assert all(f.memory.total <= 80 * GIB * 0.92 for f in fits)


def _plan(config: str, *extra: str) -> str:
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "plan", "-c", f"configs/{config}.yaml", *extra],
                       cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def _numbers(line: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"[0-9][0-9,]*\.?[0-9]*(?:e[+-]?[0-9]+)?", line)]


def test_plan_command_for_7b_matches_a_hand_calculation():
    """configs/llama-7b.yaml on 64 H100 at $2/GPU-hour: every figure of the summary from first principles."""
    out = {
        line.split(":")[0]: line
        for line in _plan("llama-7b", "--gpu", "h100", "--price-per-gpu-hour", "2").splitlines()
    }
    V, H, L, F, S, gbs, gpus = 32000, 4096, 32, 11008, 4096, 1024, 64
    params = 2 * V * H + L * (4 * H * H + 3 * H * F + 2 * H) + H  # untied embeddings, no biases, RMSNorm
    assert params == 6_738_415_616 and f"({params:,})" in out["model"]
    flops = 6 * (params - V * H) + 12 * L * S * H  # 6N without the input embedding, plus attention (PaLM, app. B)
    assert _numbers(out["model"])[-1] == pytest.approx(flops, rel=1e-3)
    step_s = _numbers(out["step"])[0]
    assert step_s >= gbs * S * flops / (gpus * 989e12 * 0.40)  # overheads only add to the ideal at MFU 40%
    tokens, _, steps, hours, gpu_hours, cost = _numbers(out["target"])
    assert tokens == pytest.approx(20 * params, rel=1e-3) and steps == math.ceil(20 * params / (gbs * S))
    assert hours == pytest.approx(steps * step_s / 3600, abs=0.06)
    assert gpu_hours == pytest.approx(hours * gpus, abs=0.06 * gpus) and cost == pytest.approx(gpu_hours * 2, abs=2)
    # checkpoint: fp32 master + AdamW's two fp32 moments = 12 bytes per parameter, spread over 8 nodes of 8;
    # at 2 GB/s per node; format 1 had one writer per TP slice (2 ranks: one node)
    size_gb, per_node_gb, nodes, seconds, gbps, format1_s = _numbers(out["checkpoint"].replace("fp32", ""))[:6]
    assert size_gb == pytest.approx(12 * params / 1e9, abs=0.05) and nodes == 8 and gbps == 2
    assert per_node_gb == pytest.approx(12 * params / 1e9 / 8, abs=0.05)
    assert seconds == pytest.approx(12 * params / 8 / 2e9, abs=0.05) and format1_s == pytest.approx(
        12 * params / 2e9, abs=0.5
    )


@pytest.mark.parametrize("config", ["llama-1b", "llama-70b"])
def test_plan_command_prints_a_summary(config):
    out = _plan(config, "--gpu", "h100", "--price-per-gpu-hour", "2")
    assert "memory per device" in out and "GPU-hours" in out and "$" in out
