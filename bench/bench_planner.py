"""The planner against reality: for tiny layouts run here, predicted memory per rank and step time beside the
measured peak RSS and median step time, with their ratios. Usage: python bench/bench_planner.py

The prediction uses the CPU entry of parallelism/devices.json (one core per rank) and an assumed MFU of 0.6;
measured memory is the peak resident set of the process, which includes the Python, torch and DeepSpeed runtime
that the planner covers only with its fixed 1 GiB."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import shardforge, write_result  # noqa: E402
from core.config import load_config  # noqa: E402
from launcher.planner import GIB, CandidateLayout, plan_layout  # noqa: E402

MODEL = [
    "model.num_layers=4",
    "model.hidden_size=256",
    "model.num_attention_heads=8",
    "model.ffn_hidden_size=768",
    "data.seq_length=128",
    "tokenizer.vocab_size=4096",
    "train.micro_batch_size=8",
    "train.global_batch_size=16",
    "data.max_documents=300",
    "data.dedup_near=false",
    "train.eval_interval=1000",
    "logging.log_interval=1000",
    "checkpoint.interval=1000",
]
LAYOUTS = [(1, 1, 1, 0), (1, 1, 2, 1), (2, 1, 1, 0), (1, 2, 1, 0)]
MFU = 0.6  # dense fp32 matmuls on one core reach most of its peak


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    base = [f"run_dir={tmp}", *MODEL]
    shardforge("data", "prepare", "-c", "configs/tiny.yaml", *base)
    rows = []
    for tp, pp, dp, zero in LAYOUTS:
        over = [
            *base,
            f"run_dir={tmp}/r{tp}{pp}{dp}{zero}",
            f"data.output_dir={tmp}/data",
            "train.max_steps=12",
            f"parallel.nproc={tp * pp * dp}",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"parallel.zero_stage={zero}",
        ]
        shardforge("train", "-c", "configs/tiny.yaml", *over, OMP_NUM_THREADS="1")
        res = json.loads((tmp / f"r{tp}{pp}{dp}{zero}" / "train_result.json").read_text())
        cfg = load_config(REPO / "configs" / "tiny.yaml", over)
        plan = plan_layout(cfg, 4096, CandidateLayout(tp, pp, dp, zero, 8, "none"), "cpu", tp * pp * dp, MFU)
        step = statistics.median(res["step_times"][3:])
        rows.append(
            {
                "layout": f"tp{tp} pp{pp} dp{dp} zero{zero}",
                "predicted_memory_gb": round(plan.memory.total / GIB, 3),
                "measured_peak_rss_gb": round(res["peak_rss_gb"], 3),
                "memory_ratio_measured_over_predicted": round(res["peak_rss_gb"] * GIB / plan.memory.total, 3),
                "predicted_step_s": round(plan.step_s, 4),
                "measured_step_s": round(step, 4),
                "step_ratio_measured_over_predicted": round(step / plan.step_s, 3),
            }
        )
    write_result(
        "planner",
        {"assumed_mfu": MFU, "layouts": rows, "notes": "1 thread per rank; memory is the writer rank's peak RSS"},
    )


if __name__ == "__main__":
    main()
