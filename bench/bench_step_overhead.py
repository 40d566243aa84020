"""Per-step overhead: `shardforge train` (1 process, ZeRO-0) beside a plain nanoGPT-style PyTorch loop of the same
architecture, step by step in the same process.

The shape is nanoGPT's CPU recipe (4 layers, 4 heads, hidden 128, context 64, batch 12, GELU, LayerNorm without
biases, learned positions, tied embeddings, AdamW with weight decay on matrices, clipping at 1.0). The plain loop is
written here, self-contained: one fused qkv Linear, torch's SDPA, AdamW (fused where available), random windows of
a token array per step as nanoGPT's ``get_batch`` takes them.

Paired steps (bench/paired.py): a plain loop step beside each `shardforge train` step (after it, every other time
before it), in the same process, so both see the same machine at the same moment; a plain step includes its
``get_batch``.

Usage: python bench/bench_step_overhead.py [--steps 300]. Writes bench/results/step_overhead.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import paired  # noqa: E402
from bench.common import shardforge, write_result  # noqa: E402

VOCAB, SEQ, BATCH, LAYERS, HEADS, HIDDEN = 512, 64, 12, 4, 4, 128
WARMUP = 20  # steps left out of the medians (allocator and thread pools settle)

SHAPE = [
    f"model.num_layers={LAYERS}",
    f"model.hidden_size={HIDDEN}",
    f"model.num_attention_heads={HEADS}",
    f"model.ffn_hidden_size={4 * HIDDEN}",
    "model.position_embedding=learned",
    "model.normalization=LayerNorm",
    "model.activation=gelu",
    "model.bias=false",
    "model.tie_embeddings=true",
    "model.dropout=0.0",
    f"data.seq_length={SEQ}",
    f"tokenizer.vocab_size={VOCAB}",
    f"train.micro_batch_size={BATCH}",
    f"train.global_batch_size={BATCH}",
    "parallel.nproc=1",
    "parallel.zero_stage=0",
    "optim.lr=0.001",
    "optim.weight_decay=0.1",
    "optim.clip_grad=1.0",
    "train.eval_interval=100000",
    "logging.log_interval=100000",
    "checkpoint.interval=100000",
    "data.max_documents=400",
    "data.dedup_near=false",
]


def plain_loop(train_args: list[str] | None = None):
    """nanoGPT's model and loop, reduced to what this shape uses: returns a function that runs one step (the
    shape is this file's; ``train_args`` are not read)."""
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(HIDDEN, bias=False), nn.LayerNorm(HIDDEN, bias=False)
            self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN, bias=False)
            self.c_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.fc, self.proj = nn.Linear(HIDDEN, 4 * HIDDEN, bias=False), nn.Linear(4 * HIDDEN, HIDDEN, bias=False)

        def attn(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(HIDDEN, dim=2)
            q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.proj(F.gelu(self.fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(SEQ, HIDDEN)
            self.h = nn.ModuleList(Block() for _ in range(LAYERS))
            self.ln_f = nn.LayerNorm(HIDDEN, bias=False)
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)
            self.lm_head.weight = self.wte.weight
            for name, p in self.named_parameters():
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith(("c_proj.weight", "proj.weight")) else 0.02
                if p.dim() == 2:
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = self.lm_head(self.ln_f(x))
            return F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))

    torch.manual_seed(1337)
    model = GPT()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = "fused" in torch.optim.AdamW.__init__.__code__.co_varnames and torch.cuda.is_available()
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), **({"fused": True} if fused else {}))
    data = np.random.default_rng(0).integers(0, VOCAB, 1_000_000, dtype=np.uint16)

    def get_batch():
        ix = torch.randint(len(data) - SEQ - 1, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i : i + SEQ].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + SEQ].astype(np.int64)) for i in ix])
        return x, y

    def step() -> None:
        x, y = get_batch()
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT reads the loss every logged iteration (log_interval=1 in its CPU recipe)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        over = [f"run_dir={tmp}/run", f"data.output_dir={tmp}/data", *SHAPE]
        shardforge("data", "prepare", "-c", "configs/tiny.yaml", *over)
        times = paired.run("bench.bench_step_overhead:plain_loop", ["-c", "configs/tiny.yaml", *over], args.steps)
    s = paired.summary(times, WARMUP)
    write_result(
        "step_overhead",
        {
            "model": f"GPT {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, GELU, LayerNorm, learned positions, tied "
            f"embeddings, vocab {VOCAB}, context {SEQ}, batch {BATCH}, fp32, AdamW, clip 1.0",
            "steps": args.steps,
            "paired_steps": s["paired_steps"],
            "shardforge_ms_per_step": s["shardforge_ms"],
            "plain_loop_ms_per_step": s["other_ms"],
            "shardforge_tokens_per_s_vs_plain": s["ratio"],
            "ratio_quartiles": s["ratio_quartiles"],
            "notes": "paired steps in one process (bench/paired.py: a plain step after each shardforge step, before "
            f"it every other step), medians after {WARMUP} warm-up steps; the ratio is the median of the per-step "
            "ratios plain/shardforge; "
            "a shardforge step includes its data wait and callbacks, a plain step its get_batch; every core",
        },
    )


if __name__ == "__main__":
    main()
