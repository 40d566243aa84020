"""Metrics of the whole cluster, not one rank: per-rank figures gathered every log interval, stragglers, goodput.

:class:`ClusterMetrics` runs on every rank: each log interval, one all-gather (a small device tensor, on the
default group) of each rank's mean step time, busy time (step time less data wait and less the time spent
waiting in the step's collectives for other ranks: the rank everyone waits for has the largest), data wait, peak
RSS, peak device memory and last checkpoint save. The writing rank puts min, median, max and the rank of the
max in TensorBoard (``cluster/<metric>_max_rank``) and warns when one rank's busy time exceeds the median of the
others by more than ``logging.straggler_share`` for ``logging.straggler_intervals`` intervals in a row.

:class:`Goodput` splits this start's wall time (from the process's creation) into start-up, training steps, data
wait, validation, checkpoint saves (blocked), other callbacks and lost work (steps redone after a failure: their
number is at or below the highest step an earlier start reached). Each start's figures are kept in
``RUN_DIR/goodput.json`` (written every log interval, so a crashed start's figures survive) and summed there.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from core.files import write_json_atomic
from training.trainer import Callback, StepMetrics, Trainer

FIELDS = ("step_time_s", "busy_s", "data_wait_s", "rss_gb", "device_gb", "save_s")
HOST_BYTES = 64
GOODPUT = ("startup", "steps", "data_wait", "validation", "checkpoint", "other", "lost")


def gather_rows(values: list[float], device: torch.device, group=None) -> list[list[float]]:
    """Every rank's ``values`` (one all-gather of a float64 device tensor over ``group``; None: all ranks)."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [values]
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return [r.tolist() for r in rows]


def gather_hosts(device: torch.device, group=None) -> list[str]:
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # the Slurm node name, else the host
    name = host.encode()[:HOST_BYTES].ljust(HOST_BYTES, b"\0")
    rows = gather_rows([float(b) for b in name], device, group)
    return [bytes(int(v) for v in row).rstrip(b"\0").decode(errors="replace") for row in rows]


def stragglers(busy: list[float], share: float) -> list[int]:
    """Ranks whose busy time exceeds the median of the other ranks' by more than ``share``."""
    out = []
    for r, b in enumerate(busy):
        others = busy[:r] + busy[r + 1 :]
        if others and b > (1 + share) * statistics.median(others):
            out.append(r)
    return out


class ClusterMetrics(Callback):
    def __init__(self, interval: int, device: torch.device, tb, printer, share: float, intervals: int,
                 last_save_s) -> None:  # fmt: skip
        self.interval, self.device, self.tb, self.print = interval, device, tb, printer
        self.share, self.intervals, self.last_save_s = share, intervals, last_save_s
        self.hosts: list[str] = []
        self.slow_for: dict[int, int] = {}
        self.warnings: list[tuple[int, int, str]] = []  # (step, rank, host)
        self._sums = [0.0, 0.0, 0.0]
        self._n = 0

    def on_train_start(self, trainer: Trainer) -> None:
        self.hosts = gather_hosts(self.device)

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        busy = max(m.step_time_s - m.data_wait_s - m.sync_wait_s, 0.0)
        for i, v in enumerate((m.step_time_s, busy, m.data_wait_s)):
            self._sums[i] += v
        self._n += 1
        if m.step % self.interval and m.step != trainer.max_steps:
            return
        device_gb = torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else 0.0
        mine = [s / self._n for s in self._sums] + [psutil.Process().memory_info().rss / 2**30, device_gb,
                                                     self.last_save_s()]  # fmt: skip
        self._sums, self._n = [0.0, 0.0, 0.0], 0
        rows = gather_rows(mine, self.device)
        self._report(m.step, rows)

    def _report(self, step: int, rows: list[list[float]]) -> None:
        busy = [r[1] for r in rows]
        slow = set(stragglers(busy, self.share))
        self.slow_for = {r: self.slow_for.get(r, 0) + 1 for r in slow}
        if self.tb is None:
            return
        values = {}
        for i, name in enumerate(FIELDS):
            col = [r[i] for r in rows]
            top = max(range(len(col)), key=col.__getitem__)
            values |= {f"cluster/{name}_min": min(col), f"cluster/{name}_median": statistics.median(col),
                       f"cluster/{name}_max": col[top], f"cluster/{name}_max_rank": top}  # fmt: skip
        flagged = [r for r, n in self.slow_for.items() if n >= self.intervals]
        values["cluster/stragglers"] = len(flagged)
        self.tb.scalars(values, step)
        for r in flagged:
            host = self.hosts[r] if r < len(self.hosts) else "?"
            self.warnings.append((step, r, host))
            if self.print:
                med = statistics.median(busy[:r] + busy[r + 1 :])
                self.print(f"step {step:>6} | warning: straggler rank {r} on {host}: busy {busy[r] * 1000:.0f} ms "
                           f"a step, the other ranks' median {med * 1000:.0f} ms, for {self.slow_for[r]} log "
                           f"intervals in a row", flush=True)  # fmt: skip


class Goodput(Callback):
    """Where this start's wall time went (see the module text); kept in RUN_DIR/goodput.json across starts."""

    def __init__(self, run_dir: str, interval: int, tb, enabled: bool) -> None:
        self.path, self.interval, self.tb, self.enabled = Path(run_dir) / "goodput.json", interval, tb, enabled
        self.created = float(os.environ.get("SHARDFORGE_T0") or psutil.Process().create_time())  # the rank's start
        self.seconds = dict.fromkeys(GOODPUT, 0.0)
        self.earlier: list[dict] = []
        self.redo_until = 0
        self._last_end: float | None = None
        self._counted_since = 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        self.seconds["startup"] = time.time() - self.created
        if self.path.is_file():
            self.earlier = json.loads(self.path.read_text())["starts"]
        self.redo_until = max((s["last_step"] for s in self.earlier), default=0)

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        now = time.time()
        if self._last_end is not None:  # the callbacks after the previous step, less what was counted apart
            gap = now - self._last_end - m.step_time_s
            self.seconds["other"] += max(gap - self._counted_since, 0.0)
        key = "lost" if m.step <= self.redo_until else "steps"
        self.seconds[key] += m.step_time_s - (0.0 if key == "lost" else m.data_wait_s)
        if key == "steps":
            self.seconds["data_wait"] += m.data_wait_s
        self._last_end, self._counted_since = now, 0.0
        if self.enabled and (m.step % self.interval == 0 or m.step == trainer.max_steps):
            self.write(m.step)

    def counted(self, key: str, seconds: float) -> None:
        """Validation or checkpoint time spent in a callback (not counted again as ``other``)."""
        self.seconds[key] += seconds
        self._counted_since += seconds

    def record(self, step: int) -> dict:
        wall = time.time() - self.created
        return {"last_step": step, "wall_s": wall, **{f"{k}_s": v for k, v in self.seconds.items()}}

    def write(self, step: int) -> dict:
        starts = [*self.earlier, self.record(step)]
        totals = {k: sum(s[k] for s in starts) for k in starts[-1] if k.endswith("_s")}
        totals["goodput"] = totals["steps_s"] / max(totals["wall_s"], 1e-9)
        # replaced whole, not fsynced: a write every log interval
        write_json_atomic(self.path, {"starts": starts, "totals": totals}, indent=1, durable=False)
        if self.tb is not None:
            self.tb.scalars({f"goodput/{k}": v for k, v in totals.items()}, step)
        return totals

    def on_train_end(self, trainer: Trainer) -> None:
        if self.enabled:
            self.write(trainer.state.step)
