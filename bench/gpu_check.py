"""The GPU check: does `shardforge train` work on a GPU, and how fast? One script for when a device is lent.

1. A small Llama-style GPT trained 20 steps by `shardforge train` in bf16 with ZeRO-1 on one GPU: the losses fall.
2. The same run stopped at step 10 (train.exit_interval, a checkpoint, exit 75) and resumed: steps 11-20 match
   the uninterrupted run (the figure says whether bitwise, and the largest relative difference).
3. With two or more GPUs: the same model at DP=2 (ZeRO-1) trains and its losses fall.
4. The MFU benchmark (bench/bench_gpu.py: ~1B GPT in bf16 beside a bare PyTorch loop).
Writes OUT/gpu_check.json and exits non-zero when a check fails. ``--cpu-dry-run`` runs steps 1-3 on CPU with a
tiny fp32 model to check the script itself (no MFU). Usage: python bench/gpu_check.py OUT [--cpu-dry-run]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_MODEL = ["model.num_layers=4", "model.hidden_size=512", "model.num_attention_heads=8",
             "model.ffn_hidden_size=1408", "train.max_steps=20", "checkpoint.interval=10", "logging.log_interval=1",
             "train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_length=512"]  # fmt: skip
CPU_MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.ffn_hidden_size=128", "train.max_steps=20", "checkpoint.interval=10", "logging.log_interval=1",
             "train.micro_batch_size=2", "train.global_batch_size=4", "data.seq_length=64", "train.precision=fp32",
             "tokenizer.vocab_size=512", "data.max_documents=200", "optim.lr=0.003"]  # fmt: skip


def shardforge(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=env, capture_output=True, text=True)
    print(f"$ shardforge {' '.join(args)}  -> exit {r.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
    if check and r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], flush=True)
        raise SystemExit(f"gpu_check: `shardforge {args[0]}` failed with exit {r.returncode}")
    return r


def train(run: Path, common: list[str], *extra: str, check: bool = True) -> tuple[int, dict]:
    r = shardforge("train", "-c", "configs/gpu-1b.yaml", f"run_dir={run}", *common, *extra, check=check)
    result = run / "train_result.json"
    return r.returncode, json.loads(result.read_text()) if result.exists() else {}


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main() -> int:
    out = Path(sys.argv[1]).resolve()
    dry = "--cpu-dry-run" in sys.argv
    import torch

    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --cpu-dry-run to check the script on CPU)")
    gpus = 0 if dry else torch.cuda.device_count()
    data = out / "data"
    model = CPU_MODEL if dry else GPU_MODEL
    common = [f"data.output_dir={data}", *model, *(["parallel.nproc=1", "parallel.zero_stage=1"])]
    shardforge("data", "prepare", "-c", "configs/gpu-1b.yaml", f"run_dir={out}/prep", *common)
    figures: dict = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "gpus": gpus}
    failures = []

    _, full = train(out / "full", common)
    losses = full["losses"]
    figures["losses"] = losses
    figures["losses_fall"] = len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
    if not figures["losses_fall"]:
        failures.append(f"losses did not fall: {losses}")

    code, first = train(out / "resumed", common, "train.exit_interval=10", check=False)
    _, second = train(out / "resumed", common)
    figures["resume"] = {"first_exit": code, "first_steps": len(first.get("losses", [])),
                         "start_step": second.get("start_step"), "losses": second.get("losses")}  # fmt: skip
    tail = second.get("losses", [])
    if code != 75 or second.get("start_step") != 10 or len(tail) != 10:
        failures.append(f"stop at step 10 and resume did not happen as planned: {figures['resume']}")
    else:
        figures["resume"]["bitwise"] = tail == losses[10:]
        figures["resume"]["max_rel_diff"] = max_rel_diff(tail, losses[10:])
        if figures["resume"]["max_rel_diff"] > 1e-3:
            failures.append(f"resumed losses differ from the uninterrupted run's: {tail} vs {losses[10:]}")

    if gpus >= 2:
        _, dp2 = train(out / "dp2", common, "parallel.nproc=2")
        figures["dp2_losses"] = dp2.get("losses")
        if not (len(dp2.get("losses", [])) == 20 and dp2["losses"][-1] < dp2["losses"][0]):
            failures.append(f"DP=2 losses did not fall: {dp2.get('losses')}")

    if not dry:
        shardforge(
            "data", "prepare", "-c", "configs/gpu-1b.yaml", f"run_dir={out}/prep", f"data.output_dir={out}/mfu-data"
        )
        r = subprocess.run([sys.executable, "bench/bench_gpu.py", str(out / "mfu-data"), str(out / "mfu")], cwd=REPO)
        mfu_file = out / "mfu" / "gpu.json"
        figures["mfu_benchmark"] = json.loads(mfu_file.read_text()) if mfu_file.exists() else None
        if r.returncode != 0 or figures["mfu_benchmark"] is None:
            failures.append("bench/bench_gpu.py failed")
    figures["failures"] = failures
    (out / "gpu_check.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
