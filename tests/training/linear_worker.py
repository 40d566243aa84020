"""Test helper, one process: megatron's parallel linears beside Shardforge's (training.model.linear) at one TP rank,
the same weights and input; prints JSON: per case the largest differences of the output, the input gradient and the
parameter gradients, each layer's autograd node and ``native`` flag; and the decoder's linear layers."""

from __future__ import annotations

import json

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from core.config import ModelConfig, ParallelConfig
from parallelism.layout import init_distributed, seed_all, shutdown
from training.model.gpt import build_sequential, gpt_layer_specs, transformer_config
from training.model.linear import ColumnLinear, RowLinear

CASES = {  # name: (ours, megatron's, bias, skip_bias_add)
    "column_bias": (ColumnLinear, ColumnParallelLinear, True, False),  # linear_qkv with model.bias=true
    "column": (ColumnLinear, ColumnParallelLinear, False, False),  # linear_fc1, the output head
    "row_skip_bias": (RowLinear, RowParallelLinear, True, True),  # linear_proj, linear_fc2 (bias-dropout-add)
}


def pair(ours_cls, megatron_cls, bias: bool, skip_bias_add: bool):
    config = transformer_config(ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2), tp=1)
    kwargs = dict(config=config, init_method=torch.nn.init.zeros_, bias=bias, skip_bias_add=skip_bias_add)
    kwargs |= {"gather_output": False} if megatron_cls is ColumnParallelLinear else {"input_is_parallel": True}
    ours, theirs = ours_cls(24, 40, **kwargs), megatron_cls(24, 40, **kwargs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p, q in zip(ours.parameters(), theirs.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
            q.copy_(p)
    return ours, theirs


def run(layer, x: torch.Tensor, weight=None) -> dict:
    x = x.clone().requires_grad_(True)
    out, out_bias = layer(x) if weight is None else layer(x, weight=weight)
    (out.square().sum() + (out_bias.sum() if out_bias is not None else 0)).backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None] + ([weight.grad] if weight is not None else [])
    return {"out": out, "dx": x.grad, "grads": grads, "fn": type(out.grad_fn).__name__, "bias_out": out_bias}


def compare(ours, theirs, weight=None) -> dict:
    x = torch.randn(7, 3, 24, generator=torch.Generator().manual_seed(5))
    w2 = None if weight is None else weight.detach().clone().requires_grad_(True)
    a, b = run(ours, x, weight), run(theirs, x, w2)
    return {
        "native": bool(ours.native),
        "fn": a["fn"],
        "megatron_fn": b["fn"],
        "shape": list(a["out"].shape),
        "bias_returned": a["bias_out"] is not None,
        "out": (a["out"] - b["out"]).abs().max().item(),
        "out_scale": b["out"].abs().max().item(),
        "dx": (a["dx"] - b["dx"]).abs().max().item(),
        "grads": [(g - h).abs().max().item() for g, h in zip(a["grads"], b["grads"])],
    }


def decoder_layer_paths(dropout: float, groups: int | None, batch: int) -> dict:
    """A batch-first DecoderLayer (biases, RoPE, training) through its own sublayer calls (batch-first attention) and
    through megatron's TransformerLayer.forward (on the input transposed to [S, B, H]): the largest differences of
    output, input gradient and parameter gradients."""
    from training.model.gpt import DecoderLayer

    m = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, bias=True, dropout=dropout,
                    num_query_groups=groups)  # fmt: skip
    layer = DecoderLayer(transformer_config(m, tp=1), m, 0, batch_first=True)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x = torch.randn(batch, 9, 32, generator=g)
    runs = []
    for direct, seed in ((True, 5), (False, 5), (True, 6)):
        layer.direct = direct
        layer.zero_grad()
        seed_all(seed)  # the same dropout masks (torch and megatron generators) if both draw them in the same order
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out.square().sum().backward()
        runs.append((out.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
    (a, da, ga), (b, db, gb), (other_seed, _, _) = runs
    return {
        "out": (a - b).abs().max().item(),
        "dx": (da - db).abs().max().item(),
        "grads": [(u - v).abs().max().item() for u, v in zip(ga, gb)],
        "other_masks": (a - other_seed).abs().max().item(),  # dropout is active: other masks, other outputs
        "scale": b.abs().max().item(),
        "batch_first": layer.attend_batch_first is not None,
    }


def model_layouts() -> dict:
    """The whole GPT at one TP rank (learned positions, tied embeddings, biases, 2 layers): batch-first as built,
    and the same modules switched to megatron's [S, B, H] path (megatron's embedding with its transpose, megatron's
    attention forward, the loss transposing its labels): the largest differences of logits, loss and gradients."""
    from training.model.gpt import lm_loss

    m = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, bias=True, position_embedding="learned")
    model = build_sequential(gpt_layer_specs(m, 200, 16, 1), tie_embeddings=True)
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    tokens = torch.randint(0, 200, (3, 17), generator=g)
    first = [mod.batch_first for mod in model if hasattr(mod, "batch_first")]
    runs = []
    for batch_first in (True, False):
        for mod in model:
            if hasattr(mod, "batch_first"):
                mod.batch_first = batch_first
        model.zero_grad()
        logits = model(tokens[:, :-1])
        loss = lm_loss(logits, tokens[:, 1:], batch_first=batch_first)
        loss.backward()
        logits = logits if batch_first else logits.transpose(0, 1)
        runs.append((list(logits.shape), logits.detach(), loss.item(), [p.grad.clone() for p in model.parameters()]))
    (shape, a, la, ga), (_, b, lb, gb) = runs
    return {
        "built_batch_first": first,
        "logits_shape": shape,
        "logits": (a - b).abs().max().item(),
        "logits_scale": b.abs().max().item(),
        "loss": abs(la - lb),
        "grads": [(u - v).abs().max().item() for u, v in zip(ga, gb)],
        "grad_scale": max(v.abs().max().item() for v in gb),
    }


def main() -> None:
    init_distributed(ParallelConfig())
    try:
        out = {name: compare(*pair(*case)) for name, case in CASES.items()}
        tied = torch.randn(40, 24, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        ours, theirs = pair(ColumnLinear, ColumnParallelLinear, False, False)
        out["tied"] = compare(ours, theirs, weight=tied)
        m = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4)
        model = build_sequential(gpt_layer_specs(m, 200, 16, 1), tie_embeddings=True)
        kinds = (ColumnParallelLinear, RowParallelLinear)
        out["decoder"] = sorted(
            [n.rsplit(".", 1)[-1], type(mod).__name__, bool(mod.native)]
            for n, mod in model.named_modules()
            if isinstance(mod, kinds)
        )
        # one sequence: [B, S, H] and [S, B, H] are the same memory, so both paths draw the same dropout masks
        out["decoder_layer"] = decoder_layer_paths(dropout=0.1, groups=None, batch=1)
        out["decoder_layer_gqa"] = decoder_layer_paths(dropout=0.0, groups=2, batch=2)
        out["model_layouts"] = model_layouts()
        print(json.dumps(out))
    finally:
        shutdown()


if __name__ == "__main__":
    main()
