"""Hugging Face Llama format <-> Shardforge's full weights (the layer-list names of ``training.model.gpt``).

Shardforge's GPT with RMSNorm, SwiGLU, RoPE and no biases is a Llama. megatron-core keeps q, k and v in one matrix,
grouped per key/value head: for each of ``g`` groups, ``heads/g`` query heads, then one key and one value head
(``linear_qkv``: [g * (heads/g + 2) * d, H]); its SwiGLU input is [gate; up] stacked (``linear_fc1``). Both use the
same rotate-half RoPE as Hugging Face's Llama, so no permutation of q/k rows is needed. The vocabulary is padded to
a multiple of 128 inside Shardforge; the padding rows are dropped on export and zero-filled on import.

GPT-2 folders are imported by ``training.hf.gpt2``. Only safetensors files are read (no pickle): a folder with
only ``pytorch_model.bin`` is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core.config import ModelConfig
from core.errors import ConfigError, IntegrityError
from training.model import names
from training.model.gpt import ffn_size, padded_vocab


def _layer_pairs(m: ModelConfig) -> list[tuple[str, str]]:
    """(Hugging Face name, Shardforge name) for the tensors that map one to one."""
    pairs = [("model.embed_tokens.weight", names.WORD_EMBEDDINGS)]
    for i in range(m.num_layers):
        hf, sf = f"model.layers.{i}.", names.layer_prefix(i)
        pairs += [
            (hf + "input_layernorm.weight", sf + "input_layernorm.weight"),
            (hf + "self_attn.o_proj.weight", sf + "self_attention.linear_proj.weight"),
            (hf + "post_attention_layernorm.weight", sf + "pre_mlp_layernorm.weight"),
            (hf + "mlp.down_proj.weight", sf + "mlp.linear_fc2.weight"),
        ]
    pairs.append(("model.norm.weight", names.final_norm(m.num_layers)))
    return pairs


def check_llama_style(m: ModelConfig) -> None:
    wrong = [
        (k, v, want)
        for k, v, want in [
            ("model.arch", m.arch, "gpt"),
            ("model.normalization", m.normalization, "RMSNorm"),
            ("model.activation", m.activation, "swiglu"),
            ("model.position_embedding", m.position_embedding, "rope"),
            ("model.bias", m.bias, False),
        ]
        if v != want
    ]
    if wrong:
        k, v, want = wrong[0]
        raise ConfigError(f"{k}={v}: the Hugging Face Llama format needs {k}={want}", fix="export a Llama-style model")


def to_llama(tensors: dict[str, torch.Tensor], m: ModelConfig, vocab: int) -> dict[str, torch.Tensor]:
    """Shardforge full weights -> Hugging Face ``LlamaForCausalLM`` state dict (fp32)."""
    check_llama_style(m)
    out = {hf: tensors[sf] for hf, sf in _layer_pairs(m)}
    out["model.embed_tokens.weight"] = out["model.embed_tokens.weight"][:vocab]
    for i in range(m.num_layers):
        hf, sf = f"model.layers.{i}.", names.layer_prefix(i)
        q, k, v = names.split_qkv(tensors[sf + "self_attention.linear_qkv.weight"], m)
        out.update({hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k})
        out[hf + "self_attn.v_proj.weight"] = v
        gate, up = tensors[sf + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out.update({hf + "mlp.gate_proj.weight": gate, hf + "mlp.up_proj.weight": up})
    if not m.tie_embeddings:
        out["lm_head.weight"] = tensors[names.output_layer(m.num_layers)][:vocab]
    return {k: v.contiguous().float() for k, v in out.items()}


def llama_config(m: ModelConfig, vocab: int, seq_length: int, bos: int, eos: int, pad: int) -> dict:
    heads, groups, d = names.qkv_sizes(m)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": m.hidden_size,
        "intermediate_size": ffn_size(m),
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": d,
        "hidden_act": "silu",
        "max_position_embeddings": seq_length,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }


# ---- import -------------------------------------------------------------------------------------------------------


def read_hf_dir(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every safetensors tensor of a local Hugging Face checkpoint folder."""
    from safetensors.torch import load_file

    d = Path(path)
    if not (d / "config.json").is_file():
        raise ConfigError(f"model.init_from: '{d}' has no config.json", fix="give a local Hugging Face model folder")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        what = (
            "only pickle weights (pytorch_model.bin), which are not loaded"
            if (d / "pytorch_model.bin").exists()
            else "no weights"
        )
        raise ConfigError(f"model.init_from: '{d}' holds {what}", fix="save the model with safe_serialization=True")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # a truncated or corrupt file
            raise IntegrityError(f"{f} is not a readable safetensors file: {e}") from None
    return json.loads((d / "config.json").read_text()), tensors


def check_matches(hf: dict, m: ModelConfig, vocab: int, source: str) -> None:
    """Refuse a Hugging Face config that differs from ``model`` (and the data's vocabulary), naming the key."""
    check_llama_style(m)
    if hf.get("model_type") != "llama":
        raise ConfigError(f"{source}: model_type={hf.get('model_type')!r}; Llama and GPT-2 models are imported")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    heads, groups, _ = names.qkv_sizes(m)
    checks = [
        ("hidden_size", hf.get("hidden_size"), m.hidden_size, "model.hidden_size"),
        ("num_hidden_layers", hf.get("num_hidden_layers"), m.num_layers, "model.num_layers"),
        ("num_attention_heads", hf.get("num_attention_heads"), heads, "model.num_attention_heads"),
        ("num_key_value_heads", hf.get("num_key_value_heads", heads), groups, "model.num_query_groups"),
        ("intermediate_size", hf.get("intermediate_size"), ffn_size(m), "model.ffn_hidden_size"),
        ("rms_norm_eps", hf.get("rms_norm_eps"), m.norm_eps, "model.norm_eps"),
        ("rope_theta", theta, m.rope_base, "model.rope_base"),
        ("tie_word_embeddings", bool(hf.get("tie_word_embeddings", False)), m.tie_embeddings, "model.tie_embeddings"),
        ("vocab_size", hf.get("vocab_size"), vocab, "the dataset's tokenizer vocabulary"),
    ]
    for key, theirs, ours, where in checks:
        if theirs != ours:
            raise ConfigError(
                f"{source}: config.json has {key}={theirs} but {where} is {ours}",
                fix=f"set {where}={theirs}"
                if where.startswith("model.")
                else "prepare the data with that model's tokenizer",
            )
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError(f"{source}: the model has biases, which Shardforge's GPT does not")


def from_llama(hf: dict[str, torch.Tensor], m: ModelConfig, vocab: int) -> dict[str, torch.Tensor]:
    """Hugging Face Llama state dict -> Shardforge full weights (vocabulary padded with zero rows)."""
    missing = [k for k, _ in _layer_pairs(m) if k not in hf]
    if missing:
        raise ConfigError(f"the Hugging Face checkpoint lacks {missing[0]} ({len(missing)} tensors missing)")
    out = {sf: hf[k].float() for k, sf in _layer_pairs(m)}
    for i in range(m.num_layers):
        h, sf = f"model.layers.{i}.", names.layer_prefix(i)
        q, k, v = (hf[h + f"self_attn.{x}_proj.weight"].float() for x in "qkv")
        out[sf + "self_attention.linear_qkv.weight"] = names.join_qkv(q, k, v, m)
        gate, up = hf[h + "mlp.gate_proj.weight"].float(), hf[h + "mlp.up_proj.weight"].float()
        out[sf + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
    padded = padded_vocab(vocab)

    def pad(w: torch.Tensor) -> torch.Tensor:
        return torch.cat([w, w.new_zeros(padded - w.shape[0], w.shape[1])]) if w.shape[0] < padded else w

    out[names.WORD_EMBEDDINGS] = pad(out[names.WORD_EMBEDDINGS])
    if not m.tie_embeddings:
        out[names.output_layer(m.num_layers)] = pad(hf["lm_head.weight"].float())
    return out


def load_init_weights(spec: str, m: ModelConfig, vocab: int, seq_length: int = 0) -> dict[str, torch.Tensor]:
    """``model.init_from``: ``hf:DIR`` (Llama or GPT-2) -> full Shardforge weights, checked against the config."""
    if not spec.startswith("hf:"):
        raise ConfigError(f"model.init_from={spec!r} is not understood", fix="write hf:DIR or ckpt:DIR")
    path = spec[3:]
    if not Path(path).is_dir():
        raise ConfigError(f"model.init_from: '{path}' does not exist", fix="give a local Hugging Face model folder")
    hf_cfg, tensors = read_hf_dir(path)
    if hf_cfg.get("model_type") == "gpt2":
        from training.hf.gpt2 import check_gpt2_matches, from_gpt2

        seq_length = seq_length or hf_cfg.get("n_positions", 1024)
        check_gpt2_matches(hf_cfg, m, vocab, seq_length, f"{path}/config.json")
        return from_gpt2(tensors, m, vocab, seq_length)
    check_matches(hf_cfg, m, vocab, f"{path}/config.json")
    return from_llama(tensors, m, vocab)


# ---- export -------------------------------------------------------------------------------------------------------


def export_hf(checkpoint: str | Path, out: str | Path, data_dir: str | None = None, overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama folder (config.json, model.safetensors, the SentencePiece tokenizer) atomically."""
    import shutil

    from safetensors.torch import save_file

    from core.config import validate_config
    from core.files import staged_output
    from data_pipeline.sample_stream import load_dataset_manifest
    from training.checkpoint.reader import ready_weights

    with staged_output(out, overwrite) as tmp:
        weights = ready_weights(checkpoint)  # LoRA adapters merged
        cfg, step = validate_config(weights.config, f"{checkpoint}/trainer.json"), weights.step
        root = data_dir or cfg.data.output_dir
        manifest = load_dataset_manifest(root)
        tok = manifest["tokenizer"]
        vocab = tok["vocab_size"]
        state = to_llama(weights.tensors, cfg.model, vocab)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "shardforge_step": str(step)})
        config = llama_config(cfg.model, vocab, cfg.data.seq_length, tok["bos_id"], tok["eos_id"], tok["pad_id"])
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        gen = {"bos_token_id": tok["bos_id"], "eos_token_id": tok["eos_id"], "pad_token_id": tok["pad_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=1))
        shutil.copyfile(Path(root) / tok["file"], tmp / "tokenizer.model")
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        tok_cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                   "add_prefix_space": True, "legacy": True, "model_max_length": cfg.data.seq_length}  # fmt: skip
        tok_cfg.update(specials)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1))
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=1))
    return Path(out)
