"""Inference for a trained model: the same GPT math in plain PyTorch, with a KV cache, from full weights.

Training runs megatron-core layers spread over ranks; evaluation and generation run here, in one process, from a
checkpoint's full weights (``training.checkpoint.reader.ready_weights``). Same parameter names, same formulas
(RMSNorm or LayerNorm, rotate-half RoPE or learned positions, grouped-query attention, SwiGLU or GELU), and the
tests hold its logits to megatron's. Shapes: tokens (B, T) -> logits (B, T, V_padded); the cache holds (k, v) per
layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.config import ModelConfig
from training.model import names
from training.model.gpt import activation_function


def _norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, kind: str, eps: float) -> torch.Tensor:
    if kind == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)  # LayerNorm's bias is trained like its weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Decoder:
    """A GPT from full weights: ``logits, cache = decoder(tokens, cache)`` continues ``cache`` (None: empty)."""

    def __init__(
        self, weights: dict[str, torch.Tensor], m: ModelConfig, max_positions: int = 4096, lora_scale: float = 0.0
    ):
        self.w, self.m = {k: v.float() for k, v in weights.items()}, m
        self.heads = m.num_attention_heads
        self.groups = m.num_query_groups or self.heads
        self.d = m.hidden_size // self.heads
        self.vocab_padded = self.w[names.WORD_EMBEDDINGS].shape[0]
        self.max_positions = max_positions
        self.quantized: dict = {}  # name -> quantized module, after quantize_dynamic()
        self.lora_scale = lora_scale  # unmerged LoRA adapters (<linear>.lora_A / .lora_B) are applied with it
        self.act = activation_function(m.activation)
        if m.position_embedding == "rope":
            inv = 1.0 / (m.rope_base ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            self.cos, self.sin = emb.cos(), emb.sin()

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        key = name.replace(".", "/")
        if key in self.quantized:
            return self.quantized[key](x)
        out = x @ self.w[name].T
        bias = self.w.get(name.replace(".weight", ".bias"))
        if bias is not None:
            out = out + bias
        a = self.w.get(name.replace(".weight", ".lora_A"))
        if a is not None:
            out = out + (x @ a.T) @ self.w[name.replace(".weight", ".lora_B")].T * self.lora_scale
        return out

    def linear_names(self) -> list[str]:
        """The matrices of the transformer blocks and the output head (not the embedding or the norms)."""
        return names.linear_weights(self.m)

    def quantize_dynamic(self) -> None:
        """int8 dynamic quantization (torch.ao, fbgemm/x86): int8 weights per channel, activations quantized per
        batch on the fly; every matrix of :meth:`linear_names`."""
        import warnings

        from torch import nn

        mods = nn.ModuleDict()
        for name in self.linear_names():
            bias = self.w.get(name.replace(".weight", ".bias"))
            lin = nn.Linear(self.w[name].shape[1], self.w[name].shape[0], bias=bias is not None)
            lin.weight.data.copy_(self.w[name])
            if bias is not None:
                lin.bias.data.copy_(bias)
            mods[name.replace(".", "/")] = lin
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's quantized tensors are marked deprecated in torch 2.13
            self.quantized = torch.ao.quantization.quantize_dynamic(mods, {nn.Linear}, dtype=torch.qint8)

    def _attention(self, x: torch.Tensor, i: int, pos: torch.Tensor, cache: tuple | None):
        b, t, _ = x.shape
        pre, per = names.layer_prefix(i) + "self_attention.", self.heads // self.groups
        q, k, v = names.split_qkv_heads(self._linear(x, pre + "linear_qkv.weight"), self.m)
        if self.m.position_embedding == "rope":
            cos, sin = self.cos[pos], self.sin[pos]
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        new_cache = (k, v)
        if per > 1:
            k, v = k.repeat_interleave(per, dim=1), v.repeat_interleave(per, dim=1)
        past = k.shape[2] - t
        mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.d))
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.d)
        return self._linear(out, pre + "linear_proj.weight"), new_cache

    def _mlp(self, x: torch.Tensor, i: int) -> torch.Tensor:
        pre = names.layer_prefix(i) + "mlp."
        h = self._linear(x, pre + "linear_fc1.weight")
        if self.m.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.act(h)
        return self._linear(h, pre + "linear_fc2.weight")

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.w
        return _norm(x, w[name + ".weight"], w.get(name + ".bias"), self.m.normalization, self.m.norm_eps)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: list | None = None) -> tuple[torch.Tensor, list]:
        m, w = self.m, self.w
        past = 0 if cache is None else cache[0][0].shape[2]
        if past + tokens.shape[1] > self.max_positions:
            raise ValueError(f"{past + tokens.shape[1]} positions exceed the decoder's {self.max_positions}")
        pos = torch.arange(past, past + tokens.shape[1])
        x = w[names.WORD_EMBEDDINGS][tokens]
        if m.position_embedding == "learned":
            x = x + w[names.POSITION_EMBEDDINGS][pos]
        new_cache = []
        for i in range(m.num_layers):
            pre = names.layer_prefix(i)
            a, layer_cache = self._attention(self._norm(x, pre + "input_layernorm"), i, pos,
                                             None if cache is None else cache[i])  # fmt: skip
            x = x + a
            x = x + self._mlp(self._norm(x, pre + "pre_mlp_layernorm"), i)
            new_cache.append(layer_cache)
        x = self._norm(x, names.final_norm(m.num_layers, None))
        return self._linear(x, names.head_weight(m)), new_cache


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.8
    """0: greedy."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p."""
    seed: int = 0


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the set that already reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def generate(decoder: Decoder, prompt: list[int], vocab: int, s: Sampling, stop: int | None = None) -> Iterator[int]:
    """Yield new token ids one by one (prompt processed once, then one token per step with the KV cache)."""
    gen = torch.Generator().manual_seed(s.seed)
    logits, cache = decoder(torch.tensor([prompt]))
    for _ in range(s.max_new_tokens):
        last = logits[0, -1, :vocab]  # never sample the padding rows of the vocabulary
        if s.temperature <= 0:
            token = int(last.argmax())
        else:
            probs = _filter(last / s.temperature, s.top_k, s.top_p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
        yield token
        if token == stop:
            return
        logits, cache = decoder(torch.tensor([[token]]), cache)


def token_log_probs(decoder: Decoder, tokens: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every t: (B, T-1), batched ``chunk`` rows at a time."""
    out = []
    for rows in tokens.split(chunk):
        logits, _ = decoder(rows[:, :-1])
        out.append(torch.log_softmax(logits, -1).gather(-1, rows[:, 1:, None]).squeeze(-1))
    return torch.cat(out)


def stream_text(ids: Iterator[int], decode: Callable[[list[int]], str], write: Callable[[str], None]) -> list[int]:
    """Write the text of ``ids`` as it grows (decoding the whole so far keeps multi-token characters whole)."""
    done: list[int] = []
    shown = ""
    for token in ids:
        done.append(token)
        text = decode(done)
        if text.startswith(shown) and not text.endswith("\ufffd"):
            write(text[len(shown) :])
            shown = text
    text = decode(done)
    if text.startswith(shown):
        write(text[len(shown) :])
    return done
