"""The tensor-parallel plan as data: how each parameter of the full model is cut across TP ranks.

A parameter matches the first pattern whose regex finds its name; the plan gives the dimension it is split
along (``None`` = replicated) and whether it stacks two halves that are split separately (SwiGLU's
``linear_fc1`` holds [gate; up], and each TP rank keeps [gate_r; up_r]). Used by initialization, checkpoint
conversion and import/export, so all three agree.
"""

from __future__ import annotations

import re

import torch

TP_PLAN: list[tuple[str, int | None, bool]] = [
    (r"word_embeddings\.weight$", 0, False),
    (r"linear_qkv\.(weight|bias)$", 0, False),
    (r"linear_fc1\.(weight|bias)$", 0, True),  # stacked halves only when the activation is gated
    (r"linear_proj\.weight$", 1, False),
    (r"linear_fc2\.weight$", 1, False),
    (r"output_layer\.weight$", 0, False),
]


def split_rule(name: str, gated: bool) -> tuple[int | None, bool]:
    for pattern, dim, stacked in TP_PLAN:
        if re.search(pattern, name):
            return dim, stacked and gated
    return None, False


def full_shape(name: str, local: torch.Size, tp: int, gated: bool) -> tuple[int, ...]:
    dim, _ = split_rule(name, gated)
    shape = list(local)
    if dim is not None:
        shape[dim] *= tp
    return tuple(shape)


def shard(name: str, full: torch.Tensor, tp: int, rank: int, gated: bool) -> torch.Tensor:
    """This TP rank's slice of the full tensor."""
    dim, stacked = split_rule(name, gated)
    if dim is None or tp == 1:
        return full
    if stacked:
        halves = full.chunk(2, dim=dim)
        return torch.cat([h.chunk(tp, dim=dim)[rank] for h in halves], dim=dim)
    return full.chunk(tp, dim=dim)[rank]


def unshard(name: str, parts: list[torch.Tensor], gated: bool) -> torch.Tensor:
    """The full tensor from every TP rank's slice, in rank order."""
    dim, stacked = split_rule(name, gated)
    if dim is None or len(parts) == 1:
        return parts[0]
    if stacked:
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([torch.cat([h[i] for h in halves], dim=dim) for i in range(2)], dim=dim)
    return torch.cat(parts, dim=dim)
