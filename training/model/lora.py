"""LoRA adapters for fine-tuning: W x + (alpha / r) * B (A x) on chosen matrices, the base weights frozen.

Each target linear of the megatron-core layers gets ``lora_A`` [r, in] (drawn from a name-derived seed, like every
Shardforge initialization) and ``lora_B`` [out, r] (zeros, so training starts from the base model exactly), added
to its output by a forward hook. The adapters are ordinary parameters: they are checkpointed, resumed and
consolidated like the rest (``<linear>.lora_A`` / ``.lora_B``). :func:`merge` folds them into the base weights
(W + scale * B A), which is what export and serving use. Tensor and pipeline parallelism are not supported with
LoRA (the adapters are small; data parallelism and ZeRO are).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from core.config import LoraConfig
from core.errors import ConfigError
from training.model.init import seeded_generator


def _hook(module: nn.Module, args: tuple, output):
    x = args[0]
    delta = (x @ module.lora_A.T) @ module.lora_B.T * module.lora_scale
    if isinstance(output, tuple):
        return (output[0] + delta.to(output[0].dtype), *output[1:])
    return output + delta.to(output.dtype)


def add_lora(model: nn.Module, cfg: LoraConfig, seed: int) -> int:
    """Attach adapters to every target linear of ``model`` and freeze everything else; returns how many."""
    n = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in cfg.targets or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        out_f, in_f = module.weight.shape
        a = torch.randn(cfg.rank, in_f, generator=seeded_generator(seed, f"{name}.lora_A")) / math.sqrt(in_f)
        module.lora_A = nn.Parameter(a.to(module.weight.dtype))
        module.lora_B = nn.Parameter(torch.zeros(out_f, cfg.rank, dtype=module.weight.dtype))
        module.lora_scale = cfg.alpha / cfg.rank
        module.register_forward_hook(_hook)
        n += 1
    if n == 0:
        raise ConfigError(f"lora.targets={cfg.targets} match no linear layer", fix="use linear_qkv, linear_proj, ...")
    for pname, p in model.named_parameters():
        p.requires_grad = ".lora_" in pname
    return n


def merge(weights: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Full weights with adapters -> full weights without: W + scale * B @ A for every adapted matrix."""
    out = {k: v for k, v in weights.items() if ".lora_" not in k}
    for key in weights:
        if key.endswith(".lora_A"):
            base = key[: -len(".lora_A")]
            b = weights[base + ".lora_B"].double()
            out[base + ".weight"] = (weights[base + ".weight"].double() + scale * (b @ weights[key].double())).float()
    return out
