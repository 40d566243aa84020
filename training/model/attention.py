"""Causal core attention through ``torch.nn.functional.scaled_dot_product_attention``, and the batch-first
self-attention of one tensor-parallel rank.

``SDPACoreAttention`` is a drop-in for megatron-core's local ``DotProductAttention`` (same constructor and forward),
which materializes the (S x S) score matrix; SDPA picks flash or memory-efficient kernels on GPU and a fused kernel
on CPU. Shapes: query [Sq, B, heads, hd], key/value [Sk, B, groups, hd] -> context [Sq, B, heads * hd].
The model always attends causally, so the mask argument is not read.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.module import MegatronModule
from torch.nn import functional as F


class SDPACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1 / sqrt(head dim), as megatron's default

    def forward(
        self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        assert attention_bias is None and packed_seq_params is None, "not supported by SDPACoreAttention"
        out = self.attend(*(x.permute(1, 2, 0, 3) for x in (query, key, value)))  # [B, heads, S, hd]
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [B, heads, S, hd] over k, v [B, groups, S, hd] -> [B, heads, S, hd]."""
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each group serves heads/groups query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        p = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel else None
        with rng or nullcontext():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.softmax_scale)


def runs_batch_first(attention) -> bool:
    """True when megatron's ``SelfAttention`` would compute no more than what :func:`batch_first_attention` does:
    q/k/v projection, optional q/k norms and RoPE (unfused, no YaRN), SDPA, output projection, all on one TP rank,
    with no gating, recompute, offloading, context parallelism or inference kernels."""
    c = attention.config
    return (
        attention.attention_type == "self"
        and isinstance(attention.core_attention, SDPACoreAttention)
        and getattr(attention.linear_qkv, "native", False)
        and getattr(attention.linear_proj, "native", False)
        and c.context_parallel_size == 1
        and not (c.attention_output_gate or c.no_rope_freq or c.fused_single_qkv_rope or c.flash_decode)
        and not (c.test_mode or c.apply_rope_fusion or c.multi_latent_attention)
        and not hasattr(c, "yarn_rotary_scaling_factor")
        and not (attention.checkpoint_core_attention or attention.offload_qkv_linear)
        and not (attention.offload_core_attention or attention.offload_attn_proj)
    )


def batch_first_attention(attention, hidden: torch.Tensor, rope: torch.Tensor | None):
    """``SelfAttention.forward`` of a layer that :func:`runs_batch_first`, on a batch-first model's hidden states:
    [B, S, H] -> (output [B, S, H], output bias or None). The same weights and operations as megatron's on
    [S, B, H] (tests/training/test_linear.py: bitwise the same output and input gradient; weight gradients sum over
    tokens in another order). SDPA reads q, k and v with one token's q/k/v between sequence positions, not a whole
    batch's (B times farther apart in [S, B, H]: cache misses in its CPU kernels), and its output, laid out
    [B, S, heads, hd] in memory, reaches the output projection without a copy."""
    b, s, _ = hidden.shape
    mixed, _ = attention.linear_qkv(hidden)  # [B, S, groups * (per group + 2) * hd]
    groups, hd = attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head
    per_group = attention.num_attention_heads_per_partition // groups
    mixed = mixed.view(b, s, groups, (per_group + 2) * hd)  # megatron's layout: each group's queries, key, value
    query, key, value = torch.split(mixed, [per_group * hd, hd, hd], dim=3)
    query = query.reshape(b, s, -1, hd)
    if attention.q_layernorm is not None:
        query = attention.q_layernorm(query)
    if attention.k_layernorm is not None:
        key = attention.k_layernorm(key)
    if rope is not None:  # [S, 1, 1, hd] -> [1, S, 1, hd]: the same rotation of each position's vectors
        freqs, cp = rope.transpose(0, 1), attention.pg_collection.cp
        query = apply_rotary_pos_emb(query, freqs, config=attention.config, cp_group=cp)
        key = apply_rotary_pos_emb(key, freqs, config=attention.config, cp_group=cp)
    context = attention.core_attention.attend(*(x.transpose(1, 2) for x in (query, key, value)))
    return attention.linear_proj(context.transpose(1, 2).reshape(b, s, -1))
