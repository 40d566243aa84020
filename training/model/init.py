"""Layout-independent initialization: every parameter is drawn whole from a seed derived from its name, then
cut to this rank's tensor-parallel slice. The same seed gives the same full model at any TP/PP/DP layout.

Rules (GPT-2 / Megatron style): norms' weights 1, biases 0, other weights N(0, std), and the output projections of
each residual branch (``linear_proj``, ``linear_fc2``) N(0, std / sqrt(2 * num_layers)).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from parallelism.tp_plan import full_shape, shard, split_rule


def seeded_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def init_value(name: str, shape: tuple[int, ...], std: float, num_layers: int, seed: int) -> torch.Tensor:
    """The full (unsharded) initial value of parameter ``name``, in fp32."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight":
        return torch.ones(shape)
    if leaf == "bias" or len(shape) == 1:
        return torch.zeros(shape)
    if "linear_proj" in name or "linear_fc2" in name:
        std = std / math.sqrt(2.0 * num_layers)
    return torch.randn(shape, generator=seeded_generator(seed, name)) * std


@torch.no_grad()
def init_parameters(
    model: nn.Module, std: float, num_layers: int, seed: int, tp: int = 1, tp_rank: int = 0, gated: bool = False
) -> int:
    """Fill every parameter of ``model`` (names as in the full layer list); return how many were set."""
    n = 0
    for name, p in model.named_parameters():
        full = init_value(name, full_shape(name, p.shape, tp, gated), std, num_layers, seed)
        p.copy_(shard(name, full, tp, tp_rank, gated).to(p.dtype))
        mark_tensor_parallel(name, p, gated)
        n += 1
    return n


@torch.no_grad()
def load_full_parameters(model: nn.Module, full: dict[str, torch.Tensor], tp: int = 1, tp_rank: int = 0,
                         gated: bool = False) -> int:  # fmt: skip
    """Fill every parameter of ``model`` from full (unsharded) tensors by name, cut to this TP rank's slice."""
    from core.errors import ConfigError

    n = 0
    for name, p in model.named_parameters():
        if name not in full:
            raise ConfigError(f"the initial weights lack '{name}'", fix="check model.init_from against model.*")
        value = full[name]
        if value.shape != full_shape(name, p.shape, tp, gated):
            raise ConfigError(f"initial weight '{name}' has shape {tuple(value.shape)}, the model needs "
                              f"{tuple(full_shape(name, p.shape, tp, gated))}")  # fmt: skip
        p.copy_(shard(name, value, tp, tp_rank, gated).to(p.dtype))
        mark_tensor_parallel(name, p, gated)
        n += 1
    return n


def mark_tensor_parallel(name: str, p: torch.Tensor, gated: bool) -> None:
    """Tag TP-split parameters the way megatron does when it initializes them itself: gradient-norm code
    (megatron's and DeepSpeed's) counts untagged parameters once per TP group, tagged ones on every rank."""
    dim, _ = split_rule(name, gated)
    if dim is not None:
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
