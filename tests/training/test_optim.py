"""Learning-rate schedules, weight-decay groups and optimizer choice (unit tests, no ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from core.config import OptimConfig
from training.checkpoint.canonical import step_tensor
from training.optim import WarmupDecaySchedule, build_optimizer, lr_at, param_groups


def test_warmup_then_each_decay_shape():
    base = dict(lr=1.0, min_lr=0.1, warmup_steps=4)
    cos = OptimConfig(**base, decay="cosine")
    assert [lr_at(s, cos, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cos, 14) == 1.0 and lr_at(14, cos, 14) == pytest.approx(0.1)
    assert lr_at(9, cos, 14) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    lin = OptimConfig(**base, decay="linear")
    assert lr_at(9, lin, 14) == pytest.approx(0.55) and lr_at(20, lin, 14) == pytest.approx(0.1)
    const = OptimConfig(**base, decay="constant")
    assert lr_at(100, const, 14) == 1.0


def test_schedule_resumes_where_it_left_off():
    model = torch.nn.Linear(4, 4)
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    sched = WarmupDecaySchedule(opt, cfg, 10)
    for _ in range(5):
        sched.step()
    other = WarmupDecaySchedule(build_optimizer(model, cfg), cfg, 10)
    other.load_state_dict(sched.state_dict())
    assert other.get_last_lr() == sched.get_last_lr() == [lr_at(5, cfg, 10)] * 2


def test_weight_decay_skips_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "name, cls",
    [
        ("adamw", torch.optim.AdamW),
        ("adam", torch.optim.Adam),
        ("sgd", torch.optim.SGD),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
def test_each_optimizer_reduces_a_simple_loss(name, cls):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.05, momentum=0.9 if name == "sgd" else 0.0))
    assert isinstance(opt, cls)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first


def test_adam_variants_use_torchs_fused_kernel_and_keep_its_step_where_it_reads_it():
    model = torch.nn.Linear(4, 4)
    for name in ("adamw", "adam"):
        opt = build_optimizer(model, OptimConfig(name=name))
        assert all(g["fused"] for g in opt.param_groups) and len(opt.param_groups) == 2
    assert not build_optimizer(model, OptimConfig(name="sgd")).param_groups[0].get("fused")
    on_meta = torch.empty(3, device="meta")  # stands for an accelerator: torch keeps a fused step beside the weight
    fused, plain = step_tensor({"fused": True}, on_meta, 7), step_tensor({"foreach": True}, on_meta, 7)
    assert (fused.device.type, fused.dtype) == ("meta", torch.float32)
    assert (plain.device.type, plain.dtype, plain.item()) == ("cpu", torch.float32, 7.0)
