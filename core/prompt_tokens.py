"""The one encoding shared by fine-tuning data and the model: prompt tokens are stored negative.

Supervised fine-tuning shards store a prompt token ``id`` as ``-(id + 1)`` (``data_pipeline.sft`` writes them),
so one int32 sample carries both the tokens and which of them are trained on. The model reads the ``id``
(:func:`model_tokens`); the loss skips positions whose label is negative (:func:`trained`).
"""

from __future__ import annotations

import torch


def encode_prompt(ids: list[int]) -> list[int]:
    """Prompt token ids as stored in a shard: ``-(id + 1)``."""
    return [-(i + 1) for i in ids]


def model_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Stored tokens -> the ids the model reads (prompt tokens decoded, others unchanged)."""
    return torch.where(tokens < 0, -tokens - 1, tokens)


def trained(labels: torch.Tensor) -> torch.Tensor:
    """A bool mask of the labels the loss counts (not prompt tokens)."""
    return labels >= 0


def has_prompt_tokens(tokens: torch.Tensor) -> bool:
    return bool((tokens < 0).any())
