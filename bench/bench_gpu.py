"""GPU check (needs a CUDA device): MFU of a ~1B GPT (configs/gpu-1b.yaml) trained by `shardforge train` in bf16
on one GPU, beside a bare PyTorch loop (same megatron-core layers, torch.autocast bf16, fused AdamW) in the same
run. Usage: python bench/bench_gpu.py DATASET_DIR OUT_DIR"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from core.config import load_config
    from training.model.flops import device_peak_flops, gpt_parameter_count, training_flops_per_token

    data, out = sys.argv[1], Path(sys.argv[2])
    over = [f"data.output_dir={data}", f"run_dir={out / 'run'}"]
    cfg = load_config(REPO / "configs" / "gpu-1b.yaml", over)
    vocab = json.loads((Path(data) / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    seq, gbs = cfg.data.seq_length, cfg.train.global_batch_size
    fpt = training_flops_per_token(cfg.model, vocab, seq)
    name, peak = device_peak_flops(None, "bf16")
    r = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "train", "-c", "configs/gpu-1b.yaml", *over],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    print(r.stdout[-3000:], r.stderr[-3000:], flush=True)
    res = json.loads((out / "run" / "train_result.json").read_text())
    fw = statistics.median(res["step_times"][5:])
    bare = bare_loop(cfg, vocab, steps=len(res["step_times"]))
    figures = {
        "device": torch.cuda.get_device_name(),
        "peak_bf16_flops_table": peak,
        "table_entry": name,
        "parameters": gpt_parameter_count(cfg.model, vocab, seq),
        "flops_per_token": fpt,
        "tokens_per_step": gbs * seq,
        "shardforge_tokens_per_s": gbs * seq / fw,
        "shardforge_mfu": gbs * seq / fw * fpt / peak,
        "bare_pytorch_tokens_per_s": gbs * seq / bare,
        "bare_pytorch_mfu": gbs * seq / bare * fpt / peak,
        "shardforge_vs_bare": bare / fw,
        "losses": res["losses"],
        "max_memory_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    (out / "gpu.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


def bare_loop(cfg, vocab: int, steps: int) -> float:
    import torch

    from parallelism.layout import init_distributed, seed_all, shutdown
    from training.model.gpt import build_sequential, gpt_layer_specs, lm_loss
    from training.model.init import init_parameters

    init_distributed(cfg.parallel.model_copy(update={"zero_stage": 0}))
    seed_all(1)
    try:
        m, seq = cfg.model, cfg.data.seq_length
        model = build_sequential(gpt_layer_specs(m, vocab, seq, 1)).cuda()
        init_parameters(model, m.init_std, m.num_layers, 1, gated=True)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        mbs, gas = cfg.train.micro_batch_size, cfg.train.global_batch_size // cfg.train.micro_batch_size
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(gas):
                tokens = torch.randint(0, vocab, (mbs, seq + 1), device="cuda")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:], batch_first=model[-1].batch_first) / gas
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[5:])
    finally:
        shutdown()


if __name__ == "__main__":
    main()
