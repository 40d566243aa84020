"""The collective wait a rank's engine measures (step time less it, and less the data wait, is the busy time the
straggler rule compares): a rank that the other waits for in DeepSpeed's gradient reduction waits least."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, TRAIN_ENV

from core.net import free_port

SLOW = 1.0  # seconds: far above what sharing the CPU with another test can take from rank 0


def test_the_rank_that_waits_in_the_gradient_reduction_measures_the_wait(tmp_path, zero=0):
    """ZeRO-0 (DeepSpeed's all-reduce at the boundary); ZeRO-1/2 go through the same call (`allreduce_gradients`)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, **TRAIN_ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        worker = [sys.executable, str(REPO / "tests" / "parallelism" / "wait_worker.py"), str(zero), str(SLOW)]
        procs.append(subprocess.Popen([*worker, str(tmp_path)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True))
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    fast, slow = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(fast) == len(slow) == 3
    # rank 0 waits for rank 1's slower backward in the gradient all-reduce, every step; rank 1 does not wait
    assert all(f >= 0.8 * SLOW and f - s >= 0.5 * SLOW for f, s in zip(fast, slow)), (fast, slow)
