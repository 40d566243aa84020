"""The GPT-style decoder, as a list of megatron-core stages (no launch, logging or checkpoint code here).

The model is a flat list of layers: ``EmbeddingStage``, ``num_layers`` x ``DecoderLayer``, ``FinalNorm``,
``OutputHead``. The same list becomes an ``nn.Sequential`` (PP = 1) or a DeepSpeed ``PipelineModule`` (PP > 1), so
parameter names (``"<layer index>.<module path>"``) are the same in both. Every layer-spec choice (local
pure-PyTorch spec, or Transformer Engine's when installed and a GPU is present) is made in ``layer_spec``.
Shapes: tokens (B, S) -> hidden [S, B, H] -> logits [S, B, V / tp] (this rank's vocabulary shard), megatron's
layout; or, where the model runs :func:`batch_first_layout` (one TP rank, SDPA attention), hidden [B, S, H] -> logits
[B, S, V], as a plain PyTorch GPT does: no transposes between the embedding, the attention and the loss.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from core.config import ModelConfig
from core.prompt_tokens import trained

VOCAB_MULTIPLE = 128  # pad the vocabulary so every TP size up to 128 divides it; the model is TP-independent


def padded_vocab(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def ffn_size(m: ModelConfig) -> int:
    if m.ffn_hidden_size:
        return m.ffn_hidden_size
    if m.activation == "swiglu":
        return -(-int(8 * m.hidden_size / 3) // 64) * 64
    return 4 * m.hidden_size


def activation_function(name: str):
    """The MLP's activation for ``model.activation`` (shared with the decoder, so both compute the same)."""
    import functools

    import torch.nn.functional as F

    return {"swiglu": F.silu, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}[name]


def transformer_config(
    m: ModelConfig, tp: int, precision: str = "fp32", recompute: str = "none", sequence_parallel: bool = False
):
    """megatron-core's TransformerConfig for ``m`` at tensor-parallel size ``tp`` (pipeline placement is ours)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=ffn_size(m),
        normalization=m.normalization,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=activation_function(m.activation),
        add_bias_linear=m.bias,
        layernorm_epsilon=m.norm_eps,
        hidden_dropout=m.dropout,
        attention_dropout=m.dropout,
        init_method_std=m.init_std,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=precision == "bf16",
        use_cpu_initialization=True,
        perform_initialization=False,  # training.model.init fills weights, independently of the layout
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity="selective" if recompute == "selective" else None,
    )


class SequenceParallelNorm:
    """A torch LayerNorm/RMSNorm usable with sequence parallelism (megatron's ``WrappedTorchNorm`` refuses it).

    Its parameters are tagged ``sequence_parallel``: each TP rank sees only its slice of the sequence, so their
    gradients must be summed over the TP group (``parallelism.engine`` registers that)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def transformer_engine_layers() -> bool:
    """True when the layers are Transformer Engine's (installed, with a GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def batch_first_layout(m: ModelConfig, tp: int, recompute: str = "none", sequence_parallel: bool = False) -> bool:
    """True when the model keeps its hidden states batch-first, [B, S, H]: one TP rank (nothing is split along
    the sequence or gathered across ranks), the local layers with SDPA attention, no selective recompute (megatron
    recomputes its core attention then). Every layer then runs :func:`training.model.attention.
    batch_first_attention`; megatron's [S, B, H] layout would only add a transpose after the embedding and two
    copies per layer (0.6 ms of a 34 ms CPU step of the benchmark's model)."""
    return (
        tp == 1
        and not sequence_parallel
        and m.attention == "sdpa"
        and recompute != "selective"
        and not transformer_engine_layers()
    )


def layer_spec(normalization: str, sequence_parallel: bool = False, attention: str = "sdpa"):
    """The transformer-layer spec: Transformer Engine's when installed with a GPU, else megatron's local one
    (its linear layers native at one TP rank: ``training.model.linear``; sequence-parallel-capable norms when
    asked; torch SDPA as core attention unless ``attention="megatron"``)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if transformer_engine_layers():
        return specs.get_gpt_layer_with_transformer_engine_spec()
    from training.model.linear import ColumnLinear, RowLinear

    spec = specs.get_gpt_layer_local_spec(normalization=normalization)
    attn, mlp = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
    attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2 = ColumnLinear, RowLinear, ColumnLinear, RowLinear
    if attention == "sdpa":
        from training.model.attention import SDPACoreAttention

        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if sequence_parallel:
        spec.submodules.input_layernorm = SequenceParallelNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    return spec


@functools.lru_cache(maxsize=8)
def causal_mask(seq: int, device) -> torch.Tensor:
    """True where attention is *not* allowed, shape [1, 1, S, S] (megatron's default builds it on CUDA). Built
    once per length and device (it is only read), not on every forward of every layer."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).triu(1).view(1, 1, seq, seq)


class EmbeddingStage(nn.Module):
    """tokens (B, S) -> [S, B, H] (or [B, S, H] batch-first): word embeddings (vocab-parallel) plus learned
    positions if configured."""

    def __init__(self, config, m: ModelConfig, vocab: int, seq_length: int, batch_first: bool = False):
        super().__init__()
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

        kind = "learned_absolute" if m.position_embedding == "learned" else "none"
        self.embedding = LanguageModelEmbedding(config, vocab, seq_length, position_embedding_type=kind)
        self.batch_first = batch_first

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = positions(tokens.shape[1], tokens.device)
        if not self.batch_first:
            return self.embedding(tokens, ids)
        return self._batch_first(tokens, ids)

    def _batch_first(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What ``LanguageModelEmbedding.forward`` computes at one TP rank without sequence parallelism, before its
        transpose to [S, B, H]; the word embedding looked up by ``F.embedding`` as megatron's does, without its
        (identity) reduction over one rank."""
        e = self.embedding
        words = e.word_embeddings
        if words.deterministic_mode:
            x = words(tokens)
        else:
            x = F.embedding(tokens, words.weight)
        if e.add_position_embedding:
            x = x + e.position_embeddings(ids)
        if e.config.fp32_residual_connection:
            x = x.float()
        return e.embedding_dropout(x)


@functools.lru_cache(maxsize=8)
def positions(seq: int, device) -> torch.Tensor:
    """Position ids [1, S], broadcast over the batch where they are added: one embedding row per position looked up
    (and its gradient summed over the batch before the embedding's backward), not one per token."""
    return torch.arange(seq, device=device).unsqueeze(0)


def uses_plain_orchestration(layer) -> bool:
    """True when megatron's ``TransformerLayer`` would run only pre-norm self-attention and MLP, each added
    through its bias-dropout-add (``DecoderLayer._sublayers`` computes exactly that)."""
    from megatron.core.transformer.identity_op import IdentityOp

    c = layer.config
    return (
        isinstance(layer.cross_attention, IdentityOp)
        and not (layer.recompute_input_layernorm or layer.recompute_pre_mlp_layernorm or layer.recompute_mlp)
        and not (layer.offload_attn_norm or layer.offload_mlp_norm or layer.is_moe_layer)
        and c.cuda_graph_impl == "none"
        and not c.bias_dropout_fusion
        and not c.inference_fuse_tp_communication
    )


class DecoderLayer(nn.Module):
    """[S, B, H] -> [S, B, H] (or [B, S, H] -> [B, S, H] batch-first): one megatron-core TransformerLayer with a
    causal mask and optional RoPE."""

    def __init__(self, config, m: ModelConfig, index: int, recompute_full: bool = False, batch_first: bool = False):
        super().__init__()
        from megatron.core.transformer.transformer_layer import TransformerLayer

        spec = layer_spec(m.normalization, config.sequence_parallel, m.attention)
        self.layer = TransformerLayer(config, spec.submodules, layer_number=index + 1)
        self.rope = None
        if m.position_embedding == "rope":
            from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

            on_cpu = not torch.cuda.is_available()
            self.rope = RotaryEmbedding(
                config.kv_channels, rotary_percent=1.0, rotary_base=m.rope_base, use_cpu_initialization=on_cpu
            )
        self.recompute_full = recompute_full
        self.direct = uses_plain_orchestration(self.layer)
        from training.model.attention import batch_first_attention, runs_batch_first

        self.batch_first = batch_first
        attention = self.layer.self_attention
        self.attend_batch_first = (
            functools.partial(batch_first_attention, attention) if batch_first and runs_batch_first(attention) else None
        )
        self._rope_cache: tuple[int, torch.Tensor] | None = None

    def _rotary(self, seq: int) -> torch.Tensor | None:
        if self.rope is None:
            return None
        if self._rope_cache is None or self._rope_cache[0] != seq:
            self._rope_cache = (seq, self.rope(seq))
        return self._rope_cache[1]

    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            return self._seq_first(h)
        if self.direct and self.attend_batch_first is not None:
            return self._sublayers(h, self.attend_batch_first, self._rotary(h.shape[1]))
        # megatron's [S, B, H] inside a batch-first model (two copies): ``direct`` switched off, as the tests do to
        # compare the two paths, or an attention that cannot run batch-first
        return self._seq_first(h.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()

    def _seq_first(self, h: torch.Tensor) -> torch.Tensor:
        seq = h.shape[0] * (self.layer.config.tensor_model_parallel_size if self.layer.config.sequence_parallel else 1)
        mask, rope = causal_mask(seq, h.device), self._rotary(seq)
        if self.direct:
            attention = self.layer.self_attention
            return self._sublayers(h, lambda x, r: attention(x, attention_mask=mask, rotary_pos_emb=r), rope)
        out, _ = self.layer(h, attention_mask=mask, rotary_pos_emb=rope)
        return out

    def _sublayers(self, h: torch.Tensor, attend, rope: torch.Tensor | None) -> torch.Tensor:
        """What ``TransformerLayer.forward`` computes for this model, calling the layer's own submodules in its order:
        norm, self-attention (``attend(x, rope)``), bias-dropout-add onto the residual; norm, MLP, bias-dropout-add.
        Skipped: the orchestration for what the model does not use (cross-attention, norm and MLP recompute,
        offloading, CUDA graphs, inference kernels): 0.55 of 40 ms in a forward-backward of four small layers on
        the CPU. Same operations, same numbers (tests/training/test_linear.py)."""
        layer, fused = self.layer, self.layer.config.bias_dropout_fusion
        attn = attend(layer.input_layernorm(h), rope)
        h = layer.self_attn_bda(self.training, fused)(attn, h, layer.hidden_dropout)
        return layer.mlp_bda(self.training, fused)(layer.mlp(layer.pre_mlp_layernorm(h)), h, layer.hidden_dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.recompute_full and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, h, use_reentrant=False)
        return self._forward(h)


class FinalNorm(nn.Module):
    def __init__(self, config, m: ModelConfig):
        super().__init__()
        self.final_layernorm = SequenceParallelNorm(config, m.hidden_size, eps=config.layernorm_epsilon)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_layernorm(h)


class OutputHead(nn.Module):
    """[S, B, H] -> logits [S, B, V / tp] (or [B, S, H] -> [B, S, V] batch-first: ``self.batch_first``); with tied
    embeddings it borrows the embedding's weight."""

    def __init__(
        self, config, m: ModelConfig, vocab: int, batch_first: bool = False, tied_to: EmbeddingStage | None = None
    ):
        super().__init__()
        from training.model.linear import ColumnLinear

        self.output_layer = ColumnLinear(
            m.hidden_size,
            vocab,
            config=config,
            init_method=config.init_method,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=tied_to is not None,
        )
        self._tied = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        self.batch_first = batch_first

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        weight = self._tied[0].embedding.word_embeddings.weight if self._tied else None
        logits, _ = self.output_layer(h, weight=weight)
        return logits


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, batch_first: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over the trained labels; logits [S, B, V/tp] (vocab-parallel), or [B, S, V]
    with ``batch_first`` (one TP rank), labels (B, S).

    Prompt tokens of fine-tuning data (negative labels) are not counted. No host synchronization: the count of
    trained labels stays on the device. With one tensor-parallel rank torch's fused cross-entropy does the work
    (a third of megatron's vocab-parallel one on small vocabularies); with more, megatron's vocab-parallel
    cross-entropy, which works in place: fp32 ``logits`` are overwritten. Gather or copy them first if they are
    needed afterwards."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    if not batch_first:
        labels = labels.transpose(0, 1).contiguous()
    keep = trained(labels)
    count = keep.sum().clamp(min=1)
    initialized = parallel_state.model_parallel_is_initialized()
    if not initialized or parallel_state.get_tensor_model_parallel_world_size() == 1:
        flat = labels.masked_fill(~keep, -100).reshape(-1)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, reduction="sum") / count
    per_token = vocab_parallel_cross_entropy(logits.float(), labels.clamp(min=0))
    return (per_token * keep).sum() / count


def gpt_layer_specs(
    m: ModelConfig,
    vocab_size: int,
    seq_length: int,
    tp: int,
    precision: str = "fp32",
    recompute: str = "none",
    sequence_parallel: bool = False,
) -> list[tuple[type, tuple]]:
    """The model as (class, args) pairs, built lazily so each pipeline stage builds only its own layers."""
    config = transformer_config(m, tp, precision, recompute, sequence_parallel)
    vocab = padded_vocab(vocab_size)
    first = batch_first_layout(m, tp, recompute, sequence_parallel)
    layers: list[tuple[type, tuple]] = [(EmbeddingStage, (config, m, vocab, seq_length, first))]
    layers += [(DecoderLayer, (config, m, i, recompute == "full", first)) for i in range(m.num_layers)]
    layers += [(FinalNorm, (config, m)), (OutputHead, (config, m, vocab, first))]
    return layers


def build_sequential(specs: list[tuple[type, tuple]], tie_embeddings: bool = False) -> nn.Sequential:
    """All layers in one process (PP = 1); ties the output head to the embedding if asked."""
    mods = [cls(*args) for cls, args in specs[:-1]]
    head_cls, head_args = specs[-1]
    mods.append(head_cls(*head_args, tied_to=mods[0] if tie_embeddings else None))
    return nn.Sequential(*mods)
