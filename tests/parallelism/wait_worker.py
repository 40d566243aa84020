"""Per-rank helper for test_waits.py: a real 2-rank DeepSpeed engine (gloo) whose rank 1 takes SLOW seconds longer
in every step, either in backward (a gradient hook sleeps, before the gradient reduction) or after the reduction,
before the gradient clip's norm all-reduce; each rank reports the collective wait its engine measured per step.
Usage: RANK/WORLD_SIZE/MASTER_* set; argv: zero stage, slow seconds, where (backward or clip), output folder."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.config import validate_config
from parallelism.engine import build_engine
from parallelism.layout import init_distributed, seed_all, shutdown
from training.model.parts import model_parts
from training.optim import WarmupDecaySchedule, build_optimizer

VOCAB, SEQ, STEPS = 64, 16, 3


def main(zero: int, slow: float, where: str, out: Path) -> None:
    cfg = validate_config({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "ffn_hidden_size": 64},
        "data": {"seq_length": SEQ},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": STEPS, "precision": "fp32"},
        "parallel": {"nproc": 2, "zero_stage": zero},
    })  # fmt: skip
    layout = init_distributed(cfg.parallel)
    try:
        seed_all(0)
        engine = build_engine(model_parts(cfg, VOCAB, lambda: None), layout, cfg,
                              build_optimizer=lambda m: build_optimizer(m, cfg.optim),
                              build_schedule=lambda o: WarmupDecaySchedule(o, cfg.optim, STEPS))  # fmt: skip
        if layout.rank == 1 and where == "backward":  # the embedding's gradient comes last: before the reduction
            first = next(p for p in engine.module.parameters() if p.requires_grad)
            first.register_hook(lambda grad: (time.sleep(slow), grad)[1])
        if layout.rank == 1 and where == "clip":  # DeepSpeed calls it in its step, after the reduction
            clip = engine.ds.clip_fp32_gradients
            engine.ds.clip_fp32_gradients = lambda: (time.sleep(slow), clip())[1]
        batch = [torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(1))]
        waits = []
        for _ in range(STEPS):
            dist.barrier()
            engine.train_step(batch)
            waits.append(engine.take_sync_wait())
        (out / f"rank{layout.rank}.json").write_text(json.dumps(waits))
    finally:
        shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
