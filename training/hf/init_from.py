"""``model.init_from``: the full weights a run starts from, from a Shardforge checkpoint or a Hugging Face folder."""

from __future__ import annotations

import torch

from core.config import ModelConfig


def initial_weights(spec: str, m: ModelConfig, vocab_size: int, seq_length: int = 0) -> dict[str, torch.Tensor]:
    """``ckpt:DIR`` (a Shardforge checkpoint or consolidated folder, any layout; weights only, LoRA merged) or
    ``hf:DIR`` (a local Llama or GPT-2 folder, checked against ``m``)."""
    if spec.startswith("ckpt:"):
        from training.checkpoint.reader import ready_weights

        return ready_weights(spec[len("ckpt:") :]).tensors  # shapes are checked tensor by tensor when loaded
    from training.hf.llama import load_init_weights

    return load_init_weights(spec, m, vocab_size, seq_length)
