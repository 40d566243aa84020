"""Causal core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in for megatron-core's local ``DotProductAttention`` (same constructor and forward), which materializes
the (S x S) score matrix; SDPA picks flash or memory-efficient kernels on GPU and a fused kernel on CPU.
Shapes: query [Sq, B, heads, hd], key/value [Sk, B, groups, hd] -> context [Sq, B, heads * hd].
The model always attends causally, so the mask argument is not read.
"""

from __future__ import annotations

from contextlib import nullcontext

from megatron.core import tensor_parallel
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
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [B, heads, S, hd]
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each group serves heads/groups query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        p = self.dropout_p if self.training else 0.0
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 and not self.config.sequence_parallel else None
        with rng or nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.softmax_scale)
        b, h, s, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
