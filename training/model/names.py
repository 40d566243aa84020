"""Parameter names of the GPT layer list and megatron's q/k/v grouping: the one owner of both.

The model is a list of layers (``training.model.gpt.gpt_layer_specs``), so every full-weight name starts with the
layer's index: the embedding is layer 0, decoder layer ``i`` (0-based) is layer ``i + 1``, the final norm is layer
``L + 1`` and the output head (absent with tied embeddings) layer ``L + 2``::

    0.embedding.word_embeddings.weight       (V_padded, H)
    0.embedding.position_embeddings.weight   (S, H), learned positions only
    {i+1}.layer.self_attention.linear_qkv.weight   (g * (heads/g + 2) * d, H)
    {L+1}.final_layernorm.weight
    {L+2}.output_layer.weight                (V_padded, H)

megatron-core keeps q, k and v in one matrix grouped per key/value head: for each of ``g`` groups, ``heads/g``
query heads, then one key and one value head, each ``d = H / heads`` rows.
"""

from __future__ import annotations

import torch

from core.config import ModelConfig

WORD_EMBEDDINGS = "0.embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "0.embedding.position_embeddings.weight"
LINEAR_PARTS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def layer_prefix(i: int) -> str:
    """The name prefix of decoder layer ``i`` (0-based): ``"{i+1}.layer."``."""
    return f"{i + 1}.layer."


def final_norm(num_layers: int, what: str | None = "weight") -> str:
    """The final norm's ``what`` tensor (``None``: the module's prefix)."""
    return f"{num_layers + 1}.final_layernorm" + (f".{what}" if what else "")


def output_layer(num_layers: int) -> str:
    return f"{num_layers + 2}.output_layer.weight"


def head_weight(m: ModelConfig) -> str:
    """The matrix the logits are computed with: the word embeddings when tied, else the output layer."""
    return WORD_EMBEDDINGS if m.tie_embeddings else output_layer(m.num_layers)


def linear_weights(m: ModelConfig) -> list[str]:
    """Every decoder linear's weight and the untied output layer (what int8 quantization stores as int8)."""
    names = [layer_prefix(i) + part + ".weight" for i in range(m.num_layers) for part in LINEAR_PARTS]
    return names + ([] if m.tie_embeddings else [output_layer(m.num_layers)])


def qkv_sizes(m: ModelConfig) -> tuple[int, int, int]:
    """(query heads, key/value groups, head size)."""
    heads = m.num_attention_heads
    return heads, m.num_query_groups or heads, m.hidden_size // heads


def split_qkv(w: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's grouped ``linear_qkv`` rows (weight or bias as (rows, 1)) -> q (heads*d, ...), k, v (g*d, ...)."""
    heads, groups, d = qkv_sizes(m)
    per = heads // groups
    w = w.view(groups, (per + 2) * d, -1)
    q, k, v = w[:, : per * d], w[:, per * d : (per + 1) * d], w[:, (per + 1) * d :]
    return q.reshape(heads * d, -1), k.reshape(groups * d, -1), v.reshape(groups * d, -1)


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`split_qkv`."""
    heads, groups, d = qkv_sizes(m)
    per = heads // groups
    hidden = q.shape[-1]
    parts = [q.view(groups, per * d, hidden), k.view(groups, d, hidden), v.view(groups, d, hidden)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def split_qkv_heads(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations of ``linear_qkv`` (B, T, g*(heads/g+2)*d) -> q (B, heads, T, d), k and v (B, g, T, d)."""
    heads, groups, d = qkv_sizes(m)
    per = heads // groups
    b, t = qkv.shape[:2]
    qkv = qkv.view(b, t, groups, per + 2, d)
    q = qkv[:, :, :, :per].reshape(b, t, heads, d).transpose(1, 2)
    return q, qkv[:, :, :, per].transpose(1, 2), qkv[:, :, :, per + 1].transpose(1, 2)
