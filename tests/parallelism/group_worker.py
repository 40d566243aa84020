"""Per-rank helper for test_backend.py: start the default group with the device map Shardforge uses on GPUs
(gloo standing in for NCCL, which a CPU machine lacks), build megatron-core's groups at TP=2, and report for each
group its backend string and the result of an all-reduce of a CPU tensor. Usage: RANK/WORLD_SIZE/MASTER_* set."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from parallelism.layout import process_group_backend


def main(out: str) -> None:
    gpu_backend = process_group_backend(cuda_available=True)
    dist.init_process_group(gpu_backend.replace("nccl", "gloo"))
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    groups = {
        "default": None,
        "tp": ps.get_tensor_model_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group(),
        "dp": ps.get_data_parallel_group(),
        "mp": ps.get_model_parallel_group(),
    }
    report = {}
    for name, group in groups.items():
        value = torch.ones(1)
        dist.all_reduce(value, group=group)
        report[name] = {
            "backend": dist.get_backend_config(group),
            "sum": float(value),
            "size": dist.get_world_size(group),
        }
    cuda_only = dist.new_group(backend="cuda:gloo")  # the old choice's map: no CPU entry
    try:
        dist.all_reduce(torch.ones(1), group=cuda_only)
        report["cuda_only_error"] = None
    except RuntimeError as e:
        report["cuda_only_error"] = str(e).splitlines()[0]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
