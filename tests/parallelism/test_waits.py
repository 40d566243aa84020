"""The collective wait a rank's engine measures (step time less it, and less the data wait, is the busy time the
straggler rule compares): a rank that the other waits for in DeepSpeed's gradient reduction waits least."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, run_ranks

SLOW = 1.0  # seconds: far above what sharing the CPU with another test can take from rank 0


@pytest.mark.parametrize("where", ["backward", "clip"])
def test_the_rank_that_waits_for_a_slow_one_measures_the_wait(tmp_path, where, zero=0):
    """ZeRO-0: DeepSpeed's gradient all-reduce at the boundary (ZeRO-1/2 go through the same call,
    `allreduce_gradients`), and the gradient clip's norm all-reduce after it (rank 1 slow between the two)."""
    run_ranks(REPO / "tests" / "parallelism" / "wait_worker.py", str(zero), str(SLOW), where, str(tmp_path))
    fast, slow = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(fast) == len(slow) == 3
    # rank 0 waits for rank 1 in the gradient (or the norm's) all-reduce, every step; rank 1 does not wait
    assert all(f >= 0.8 * SLOW and f - s >= 0.5 * SLOW for f, s in zip(fast, slow)), (fast, slow)
