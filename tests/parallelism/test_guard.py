"""The non-finite guard in a real 2-rank engine: a micro-batch whose loss is not finite on any rank turns the whole
step into a skipped one on every rank (its gradients and later ones zeroed as they are produced, the step applied
with lr 0), so the weights stay bitwise as they were; the next finite step trains."""

from __future__ import annotations

import json

from conftest import REPO, run_ranks


def test_a_non_finite_micro_batch_on_one_rank_skips_the_step_everywhere(tmp_path):
    run_ranks(REPO / "tests" / "parallelism" / "guard_worker.py", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert len(report) == 3
        # step 0: rank 1's last micro-batch was NaN; step 1: rank 0's first (its second, finite, is zeroed too)
        assert [s["loss"] is None for s in report] == [True, True, False]
        assert [s["unchanged"] for s in report] == [True, True, False]
        assert all(s["finite"] for s in report)
    assert reports[0][2]["loss"] == reports[1][2]["loss"] > 0  # the data-parallel mean, the same on both ranks
