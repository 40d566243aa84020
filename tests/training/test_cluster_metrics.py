"""The straggler rule. (A straggler made from outside on the real Slurm, and goodput across a crash and two
requeues: tests/slurm/test_slurm_recovery.py.)"""

from __future__ import annotations

from training.cluster_metrics import stragglers


def test_straggler_rule_compares_with_the_other_ranks_median():
    assert stragglers([0.10, 0.10, 0.10, 0.16], 0.5) == [3]
    assert stragglers([0.10, 0.10, 0.10, 0.14], 0.5) == []
    assert stragglers([0.30, 0.10], 0.5) == [0] and stragglers([0.1], 0.5) == []
