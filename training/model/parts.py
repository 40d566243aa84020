"""Choose and describe the model for a config: the GPT layer list or an RNN baseline, with its loss and init."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from core.config import RunConfig
from core.errors import ConfigError
from parallelism.engine import ModelParts
from parallelism.layout import Layout
from training.model import gpt, rnn
from training.model.init import init_parameters, load_full_parameters


def model_parts(
    cfg: RunConfig, vocab_size: int, initial_weights: Callable[[], dict[str, torch.Tensor]] | None = None
) -> ModelParts:
    """The model for ``cfg``. With ``model.init_from``, ``initial_weights()`` returns the full weights to start
    from (``training.hf.init_from.initial_weights`` reads checkpoints and Hugging Face folders); it is called on
    each rank when the weights are initialized."""
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
        first = gpt.batch_first_layout(m, p.tp, p.activation_checkpointing, p.sequence_parallel)
        loss_fn = functools.partial(gpt.lm_loss, batch_first=first)  # the logits' layout, as the head's

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
        if cfg.lora.rank:  # the config's layout checks allow LoRA only for the GPT at TP = PP = 1
            from training.model.lora import add_lora

            add_lora(model, cfg.lora, cfg.train.seed)

    def _init_weights(model: nn.Module, layout: Layout) -> None:
        if m.init_from:  # fine-tuning / transfer: start from a checkpoint or a Hugging Face model, at any layout
            if initial_weights is None:
                raise ConfigError(f"model.init_from={m.init_from!r} needs weights, and none were given to the model")
            full = initial_weights()
            load_full_parameters(model, full, layout.tp, layout.tp_rank, gated)
            if cfg.train.keep_sparsity:
                keep_zeros(model)
            return
        init_parameters(model, m.init_std, m.num_layers, cfg.train.seed, layout.tp, layout.tp_rank, gated=gated)

    return ModelParts(specs=specs, loss_fn=loss_fn, build_sequential=build, init_weights=init_weights)


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
