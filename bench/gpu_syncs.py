"""Host synchronizations in a training step on a GPU: `launcher.train` run in this process with
``torch.cuda.set_sync_debug_mode("warn")`` around each ``engine.train_step`` (the micro-batch loop, the optimizer
step and the step's reads of the loss and the non-finite flag), every synchronizing call counted with the line that
made it. Run once with one micro-batch a step and once with several: a synchronization inside the micro-batch loop
shows as more of them per step in the second run.

Usage (on a CUDA machine): python bench/gpu_syncs.py OUT.json -c CONFIG [overrides...]; writes OUT.json:
``{"micro_batches": ..., "syncs_per_step": [...], "where": [[file:line, count], ...]}``.
"""

from __future__ import annotations

import collections
import json
import runpy
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> None:
    import torch

    from parallelism.engine import PlainEngine

    out, args = Path(sys.argv[1]), sys.argv[2:]
    original = PlainEngine.train_step
    per_step: list[int] = []
    where: collections.Counter = collections.Counter()

    def counted(self, micro_batches):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, micro_batches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                syncs = [w for w in caught if "synchroniz" in str(w.message)]
                per_step.append(len(syncs))
                where.update(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
                result = {"micro_batches": len(micro_batches), "syncs_per_step": per_step}
                out.write_text(json.dumps(result | {"where": where.most_common()}))  # in the rank, each step

    PlainEngine.train_step = counted
    sys.argv = ["launcher.train", *args]
    runpy.run_module("launcher.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
