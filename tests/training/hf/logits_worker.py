"""Per-rank helper for tests: build the megatron-core GPT for a config (any TP, PP=1), run one batch, and have
rank 0 save the full-vocabulary logits (B, T, V) to a .pt file. Run with torchrun or as one process.
With LOGITS_WORKER_PERTURB=1 (one process), every parameter is first moved off its init (LayerNorm biases too), and
the weights are saved beside the logits (OUT.weights)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from core.config import load_config
from parallelism.layout import init_distributed, seed_all, shutdown
from training.hf.init_from import initial_weights
from training.model.parts import model_parts


def main(config: str, vocab: int, tokens_file: str, out_file: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    layout = init_distributed(cfg.parallel)
    try:
        seed_all(cfg.train.seed)
        m, seq = cfg.model, cfg.data.seq_length
        parts = model_parts(cfg, vocab, lambda: initial_weights(m.init_from, m, vocab, seq))
        model = parts.build_sequential()
        parts.init_weights(model, layout)
        model.eval()
        if os.environ.get("LOGITS_WORKER_PERTURB") == "1":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.1)
            weights = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
            torch.save(weights, out_file + ".weights")  # (megatron adds non-tensor _extra_state entries)
        tokens = torch.load(tokens_file, weights_only=True)
        with torch.no_grad():
            logits = model(tokens)  # [S, B, V/tp], or [B, S, V] from a batch-first model
        if model[-1].batch_first:
            logits = logits.transpose(0, 1)
        if layout.tp > 1:
            parts_ = [torch.empty_like(logits) for _ in range(layout.tp)]
            dist.all_gather(parts_, logits.contiguous(), group=layout.tp_group)
            logits = torch.cat(parts_, dim=-1)
        if layout.rank == 0:
            torch.save(logits.transpose(0, 1).contiguous(), out_file)
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], *sys.argv[5:])
