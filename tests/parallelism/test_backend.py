"""On GPU machines the default process group must serve CPU tensors too (flags, object broadcasts, checkpoint
bookkeeping): a bare "nccl" maps only the cuda device type, and megatron-core's groups inherit the default's map."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import REPO
from torch.distributed import Backend, BackendConfig

from core.net import free_port
from parallelism.layout import process_group_backend


def device_map(backend: str) -> dict[str, str]:
    return BackendConfig(Backend(backend)).get_device_backend_map()


def test_gpu_backend_covers_cpu_and_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_map(process_group_backend()) == {"cpu": "gloo", "cuda": "nccl"}
    assert device_map("nccl") == {"cuda": "nccl"}  # the old choice: no CPU entry


def test_cpu_backend_is_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_map(process_group_backend())["cpu"] == "gloo"


def test_megatron_groups_inherit_the_cpu_entry(tmp_path):
    port = free_port()
    out = tmp_path / "report.json"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "parallelism" / "group_worker.py"), str(out)],
                cwd=REPO,
                env=env,
                start_new_session=True,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    try:
        errors = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], errors
    report = json.loads(out.read_text())
    for name in ("default", "tp", "pp", "dp", "mp"):
        assert device_map(report[name]["backend"]) == {"cpu": "gloo", "cuda": "gloo"}, (name, report[name])
        assert report[name]["sum"] == report[name]["size"], name
    assert [report[n]["size"] for n in ("default", "tp", "pp", "dp", "mp")] == [2, 2, 1, 1, 2]
    assert "No backend type associated with device type cpu" in report["cuda_only_error"]
