"""Per-rank helper for test_guard.py: a real 2-rank DeepSpeed engine (gloo, ZeRO-0, two micro-batches a step,
clipping) whose loss is made NaN for chosen (step, rank, micro-batch); each rank reports per step the loss the engine
returned, whether every weight is bitwise what it was before the step, and whether every weight is finite.
Usage: RANK/WORLD_SIZE/MASTER_* set; argv: output folder."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from core.config import validate_config
from parallelism.engine import build_engine
from parallelism.layout import init_distributed, seed_all, shutdown
from training.model.parts import model_parts
from training.optim import WarmupDecaySchedule, build_optimizer

VOCAB, SEQ = 64, 16
POISON = {(0, 1, 1), (1, 0, 0)}  # (step, rank, micro-batch): the last micro-batch of rank 1, the first of rank 0
STEPS = 3


def main(out: Path) -> None:
    cfg = validate_config({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64},
        "data": {"seq_length": SEQ},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": STEPS, "precision": "fp32"},
        "optim": {"lr": 0.01, "warmup_steps": 0, "clip_grad": 1.0},
        "parallel": {"nproc": 2, "zero_stage": 0},
    })  # fmt: skip
    layout = init_distributed(cfg.parallel)
    try:
        seed_all(0)
        parts = model_parts(cfg, VOCAB, lambda: None)
        where = {"step": 0, "micro": 0}

        def loss_fn(logits, labels):
            loss = parts_loss(logits, labels)
            poisoned = (where["step"], layout.rank, where["micro"]) in POISON
            where["micro"] += 1
            return loss * float("nan") if poisoned else loss

        parts_loss, parts.loss_fn = parts.loss_fn, loss_fn
        engine = build_engine(parts, layout, cfg, build_optimizer=lambda m: build_optimizer(m, cfg.optim),
                              build_schedule=lambda o: WarmupDecaySchedule(o, cfg.optim, STEPS))  # fmt: skip
        g = torch.Generator().manual_seed(1 + layout.rank)
        report = []
        for step in range(STEPS):
            where.update(step=step, micro=0)
            before = [p.detach().clone() for p in engine.module.parameters()]
            batches = [torch.randint(0, VOCAB, (2, SEQ + 1), generator=g) for _ in range(2)]
            loss = engine.train_step(batches)
            after = list(engine.module.parameters())
            report.append({
                "loss": None if math.isnan(loss) else loss,
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                "finite": all(bool(torch.isfinite(p).all()) for p in after),
            })  # fmt: skip
        (out / f"rank{layout.rank}.json").write_text(json.dumps(report))
    finally:
        shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
