"""Choose and describe the model for a config: the GPT layer list or an RNN baseline, with its loss and init."""

from __future__ import annotations

from torch import nn

from launcher.config import RunConfig
from launcher.errors import ConfigError
from parallelism.engine import ModelParts
from parallelism.layout import Layout
from training import gpt, rnn
from training.init import init_parameters, load_full_parameters


def model_parts(cfg: RunConfig, vocab_size: int) -> ModelParts:
    m, p = cfg.model, cfg.parallel
    if m.arch == "gpt":
        specs = gpt.gpt_layer_specs(
            m,
            vocab_size,
            cfg.data.seq_length,
            p.tp,
            cfg.train.precision,
            p.activation_checkpointing,
            p.sequence_parallel,
        )
        loss_fn = gpt.lm_loss

        def build() -> nn.Module:
            return gpt.build_sequential(specs, m.tie_embeddings)
    else:
        specs = rnn.rnn_layer_specs(m, vocab_size)
        loss_fn = rnn.rnn_loss

        def build() -> nn.Module:
            return nn.Sequential(*[cls(*args) for cls, args in specs])

    gated = m.activation == "swiglu"

    def init_weights(model: nn.Module, layout: Layout) -> None:
        _init_weights(model, layout)
        if cfg.lora.rank:
            if layout.tp > 1 or layout.pp > 1 or m.arch != "gpt":
                raise ConfigError("lora.rank > 0 needs model.arch=gpt, parallel.tp=1 and parallel.pp=1",
                                  fix="use data parallelism (and ZeRO) with LoRA, or lora.rank=0")  # fmt: skip
            from training.lora import add_lora

            add_lora(model, cfg.lora, cfg.train.seed)

    def _init_weights(model: nn.Module, layout: Layout) -> None:
        if m.init_from:  # fine-tuning / transfer: start from a checkpoint or a Hugging Face model, at any layout
            full = initial_weights(m.init_from, m, vocab_size, cfg.data.seq_length)
            load_full_parameters(model, full, layout.tp, layout.tp_rank, gated)
            if cfg.train.keep_sparsity:
                keep_zeros(model)
            return
        init_parameters(model, m.init_std, m.num_layers, cfg.train.seed, layout.tp, layout.tp_rank, gated=gated)

    return ModelParts(specs=specs, loss_fn=loss_fn, build_sequential=build, init_weights=init_weights)


def initial_weights(spec: str, m, vocab_size: int, seq_length: int = 0) -> dict:
    """``model.init_from``: ``ckpt:DIR`` (a Shardforge checkpoint, any layout; weights only) or ``hf:DIR``."""
    if spec.startswith("ckpt:"):
        from training.consolidate import full_weights

        tensors, _, _ = full_weights(spec[len("ckpt:") :])
        return tensors  # shapes are checked tensor by tensor when they are loaded
    from training.hf import load_init_weights

    return load_init_weights(spec, m, vocab_size, seq_length)


def keep_zeros(model: nn.Module) -> int:
    """Mask the gradients of every matrix's zero entries (pruned weights stay zero under AdamW with fresh
    moments: zero gradient, zero moments, zero update, and weight decay of zero is zero). Returns how many."""
    n = 0
    for _, p in model.named_parameters():
        zero = p.data == 0
        if p.dim() == 2 and bool(zero.any()):
            keep = (~zero).to(p.dtype)
            p.register_hook(lambda g, keep=keep: g * keep)
            n += 1
    return n
