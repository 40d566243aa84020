"""The one place that counts parameters and FLOPs per token from a model config (used by the log line's MFU
and the planner), and the devices' peak FLOP/s."""

from __future__ import annotations

import json
import os

from core.config import ModelConfig
from training.model.gpt import ffn_size, padded_vocab


def gpt_parameter_count(m: ModelConfig, vocab_size: int, seq_length: int) -> int:
    """Exact parameter count of the GPT built by ``training.model.gpt`` (norms have weight, +bias for LN; linear biases
    with ``model.bias``)."""
    h, layers, v = m.hidden_size, m.num_layers, padded_vocab(vocab_size)
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    kv = h // heads
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    qkv = h * (heads * kv + 2 * groups * kv)
    proj = heads * kv * h
    ffn = ffn_size(m)
    mlp = h * ffn * (2 if m.activation == "swiglu" else 1) + ffn * h
    per_layer = 2 * norm + qkv + proj + mlp
    if m.bias:  # q/k/v, attention output, MLP input (two halves when gated) and output
        per_layer += heads * kv + 2 * groups * kv + h + ffn * (2 if m.activation == "swiglu" else 1) + h
    embed = v * h + (seq_length * h if m.position_embedding == "learned" else 0)
    head = 0 if m.tie_embeddings else v * h
    return embed + layers * per_layer + norm + head


def training_flops_per_token(m: ModelConfig, vocab_size: int, seq_length: int) -> float:
    """6 x (non-embedding parameters + output head) plus attention's 12 x layers x hidden x seq (PaLM, appendix B)."""
    if m.arch != "gpt":
        h = m.hidden_size
        gates = 4 if m.arch == "lstm" else 3
        return 6.0 * (m.num_layers * gates * 2 * h * h + h * padded_vocab(vocab_size))
    n = gpt_parameter_count(m, vocab_size, seq_length)
    n -= padded_vocab(vocab_size) * m.hidden_size if not m.tie_embeddings else 0  # lookup costs no FLOPs
    n -= seq_length * m.hidden_size if m.position_embedding == "learned" else 0
    n += padded_vocab(vocab_size) * m.hidden_size if m.tie_embeddings else 0
    return 6.0 * n + 12.0 * m.num_layers * m.hidden_size * seq_length


def load_devices() -> dict:
    """The device table (peak FLOP/s, memory), shipped as package data of ``parallelism``."""
    from importlib.resources import files

    return json.loads(files("parallelism").joinpath("devices.json").read_text())


def device_peak_flops(kind: str | None = None, precision: str = "bf16") -> tuple[str, float]:
    """(device name, peak FLOP/s) for ``kind`` or for this machine's device."""
    import torch

    devices = load_devices()
    if kind is None:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name().lower()
            kind = next((k for k in devices if k != "cpu" and k in name), "h100")
        else:
            kind = "cpu"
    d = devices[kind]
    if kind == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return kind, d["fp32_flops_per_core"] * cores
    return kind, d["bf16_flops"] if precision == "bf16" else d["fp32_flops"]
