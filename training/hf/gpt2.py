"""Hugging Face GPT-2 -> Shardforge's full weights (``model.init_from=hf:DIR`` on a GPT-2 folder).

A GPT-2 is Shardforge's GPT with ``normalization: LayerNorm``, ``activation: gelu_tanh`` (GPT-2's "gelu_new"),
``position_embedding: learned``, ``bias: true`` and ``tie_embeddings: true``. GPT-2 stores its linears as
``Conv1D`` ([in, out], the transpose of a Linear) and q, k, v side by side in ``c_attn``; megatron-core keeps them
per head as [q_h; k_h; v_h] (``training.model.names.join_qkv``). Learned positions are cut to ``data.seq_length`` rows.
"""

from __future__ import annotations

import torch

from core.config import ModelConfig
from core.errors import ConfigError
from training.model import names
from training.model.gpt import ffn_size, padded_vocab

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def check_gpt2_matches(hf: dict, m: ModelConfig, vocab: int, seq_length: int, source: str) -> None:
    """Refuse a GPT-2 config.json that differs from ``model`` (or the data), naming the key and the fix."""
    act = GPT2_ACTIVATIONS.get(hf.get("activation_function", "gelu_new"))
    hidden = hf.get("n_embd")
    checks = [
        ("model.normalization", "LayerNorm", m.normalization),
        ("model.position_embedding", "learned", m.position_embedding),
        ("model.bias", True, m.bias),
        ("model.tie_embeddings", bool(hf.get("tie_word_embeddings", True)), m.tie_embeddings),
        ("model.num_query_groups", None, m.num_query_groups),
        ("model.activation", act, m.activation),
        ("model.hidden_size", hidden, m.hidden_size),
        ("model.num_layers", hf.get("n_layer"), m.num_layers),
        ("model.num_attention_heads", hf.get("n_head"), m.num_attention_heads),
        ("model.ffn_hidden_size", hf.get("n_inner") or 4 * (hidden or 0), ffn_size(m)),
        ("model.norm_eps", hf.get("layer_norm_epsilon", 1e-5), m.norm_eps),
    ]
    for where, theirs, ours in checks:
        if theirs != ours:
            raise ConfigError(f"{source}: this GPT-2 needs {where}={theirs}, the config has {ours}",
                              fix=f"set {where}={theirs}")  # fmt: skip
    if hf.get("vocab_size") != vocab:
        raise ConfigError(f"{source}: config.json has vocab_size={hf.get('vocab_size')} but the dataset's tokenizer "
                          f"has {vocab}", fix="prepare the data with that model's tokenizer")  # fmt: skip
    if hf.get("n_positions", 1024) < seq_length:
        raise ConfigError(f"{source}: n_positions={hf.get('n_positions')} is less than data.seq_length={seq_length}",
                          fix=f"set data.seq_length <= {hf.get('n_positions')}")  # fmt: skip


def from_gpt2(hf: dict[str, torch.Tensor], m: ModelConfig, vocab: int, seq_length: int) -> dict[str, torch.Tensor]:
    """GPT-2 state dict (``transformer.`` prefix or none) -> Shardforge full weights (vocabulary padded with zeros)."""
    t = {k.removeprefix("transformer."): v.float() for k, v in hf.items()}
    required = ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"] + [
        f"h.{i}.{part}" for i in range(m.num_layers)
        for part in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                     "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                     "mlp.c_proj.weight", "mlp.c_proj.bias")
    ]  # fmt: skip
    missing = [n for n in required if n not in t]
    if missing:
        raise ConfigError(f"the GPT-2 checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    wte = t["wte.weight"]
    out = {
        names.WORD_EMBEDDINGS: torch.cat([wte, wte.new_zeros(padded_vocab(vocab) - vocab, wte.shape[1])]),
        names.POSITION_EMBEDDINGS: t["wpe.weight"][:seq_length],
        names.final_norm(m.num_layers): t["ln_f.weight"],
        names.final_norm(m.num_layers, "bias"): t["ln_f.bias"],
    }
    for i in range(m.num_layers):
        h, sf = f"h.{i}.", names.layer_prefix(i)
        q, k, v = t[h + "attn.c_attn.weight"].T.chunk(3, dim=0)
        qb, kb, vb = (b[:, None] for b in t[h + "attn.c_attn.bias"].chunk(3))
        out[sf + "self_attention.linear_qkv.weight"] = names.join_qkv(q, k, v, m)
        out[sf + "self_attention.linear_qkv.bias"] = names.join_qkv(qb, kb, vb, m)[:, 0]
        out[sf + "self_attention.linear_proj.weight"] = t[h + "attn.c_proj.weight"].T
        out[sf + "self_attention.linear_proj.bias"] = t[h + "attn.c_proj.bias"]
        out[sf + "mlp.linear_fc1.weight"] = t[h + "mlp.c_fc.weight"].T
        out[sf + "mlp.linear_fc1.bias"] = t[h + "mlp.c_fc.bias"]
        out[sf + "mlp.linear_fc2.weight"] = t[h + "mlp.c_proj.weight"].T
        out[sf + "mlp.linear_fc2.bias"] = t[h + "mlp.c_proj.bias"]
        for norm, ours in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
            out[f"{sf}{ours}.weight"], out[f"{sf}{ours}.bias"] = t[f"{h}{norm}.weight"], t[f"{h}{norm}.bias"]
    return {k: v.contiguous() for k, v in out.items()}
