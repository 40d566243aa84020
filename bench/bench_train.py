"""Training throughput: `shardforge train` (DeepSpeed engine over megatron-core layers) beside a bare PyTorch loop
over the same megatron-core layers, step by step in the same process (bench/paired.py); and 2-rank data-parallel
scaling.

Usage: python bench/bench_train.py [--steps 100]. Threads: the 1-rank runs use every core; the 2-rank run gives each
rank one thread (OMP_NUM_THREADS=1), as torchrun does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import paired  # noqa: E402
from bench.common import shardforge, write_result  # noqa: E402
from core.config import load_config  # noqa: E402

WARMUP = 10  # steps left out of the medians

MODEL = [
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_attention_heads=8",
    "model.ffn_hidden_size=768",
    "data.seq_length=128",
    "tokenizer.vocab_size=4096",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "optim.clip_grad=1.0",
    "train.eval_interval=100000",
    "logging.log_interval=100000",
    "data.max_documents=400",
    "data.dedup_near=false",
]


def prepare(tmp: Path) -> list[str]:
    over = [f"run_dir={tmp}", *MODEL]
    shardforge("data", "prepare", "-c", "configs/tiny.yaml", *over)
    return over


def framework(over: list[str], steps: int, nproc: int) -> list[float]:
    root = Path(over[0][len("run_dir=") :])
    shardforge(
        "train",
        "-c",
        "configs/tiny.yaml",
        *over,
        f"train.max_steps={steps}",
        f"parallel.nproc={nproc}",
        f"run_dir={root}/n{nproc}",
        f"data.output_dir={root}/data",
        f"train.global_batch_size={8 * nproc}",
    )
    return json.loads((root / f"n{nproc}" / "train_result.json").read_text())["step_times"]


def bare_loop(train_args: list[str]):
    """The same megatron-core layer list, torch AdamW, clipping, the same batch shape: no DeepSpeed, no loader, no
    callbacks. Built in the rank of a paired run (bench/paired.py), whose process groups it uses (TP = 1)."""
    import torch

    from training.model.gpt import build_sequential, gpt_layer_specs, lm_loss
    from training.model.init import init_parameters

    cfg = load_config(REPO / "configs" / "tiny.yaml", [a for a in train_args if "=" in a])
    m = cfg.model
    model = build_sequential(gpt_layer_specs(m, 4096, cfg.data.seq_length, 1))
    init_parameters(model, m.init_std, m.num_layers, 1, gated=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        tokens = torch.randint(0, 4096, (8, cfg.data.seq_length + 1), generator=g)
        loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], batch_first=model[-1].batch_first)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    over = prepare(tmp)
    tokens = 8 * 128
    train = ["-c", "configs/tiny.yaml", *over, f"run_dir={tmp}/paired", f"data.output_dir={tmp}/data"]
    s = paired.summary(paired.run("bench.bench_train:bare_loop", train, args.steps), WARMUP)
    med = lambda xs: statistics.median(xs[WARMUP:])  # noqa: E731
    fw, dp2 = med(framework(over, args.steps // 2, 1)), med(framework(over, args.steps // 2, 2))
    write_result(
        "train",
        {
            "model": "GPT 4 layers, hidden 256, 8 heads, ffn 768 (SwiGLU), vocab 4096, seq 128, batch 8 per rank, fp32",
            "shardforge_1rank_tokens_per_s": round(tokens / (s["shardforge_ms"] / 1000)),
            "bare_pytorch_loop_tokens_per_s": round(tokens / (s["other_ms"] / 1000)),
            "shardforge_vs_bare": s["ratio"],
            "shardforge_vs_bare_quartiles": s["ratio_quartiles"],
            "paired_steps": s["paired_steps"],
            "shardforge_2rank_dp_tokens_per_s": round(2 * tokens / dp2),
            "dp2_scaling_vs_1rank": round((2 * tokens / dp2) / (tokens / fw), 3),
            "notes": f"shardforge vs bare: paired steps in one process (bench/paired.py), medians after {WARMUP} "
            "warm-up steps, the ratio the median of per-step ratios; DP scaling: two separate runs of 1 and 2 ranks "
            "(1-rank runs use all cores, 2-rank runs 1 thread each)",
        },
    )


if __name__ == "__main__":
    main()
