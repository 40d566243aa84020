"""Trainer callbacks: the console log line, TensorBoard scalars, validation with early stopping.

Values are written by one rank, the one that holds them: the last pipeline stage, tensor rank 0, data rank 0
(losses are averaged over data-parallel ranks before they get there).
"""

from __future__ import annotations

import functools
import math
import os
import time

import psutil
import torch

from training import preemption as heartbeat
from training.trainer import Callback, StepMetrics, Trainer


@functools.lru_cache(maxsize=4)
def _process(pid: int) -> psutil.Process:
    return psutil.Process(pid)  # made once per process: creating it costs more than reading its memory


def memory_gb() -> dict[str, float]:
    out = {"rss_gb": _process(os.getpid()).memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _lines(*tags: str) -> list:
    return ["Multiline", list(tags)]


def _spread(name: str) -> list:
    return _lines(*(f"cluster/{name}_{s}" for s in ("min", "median", "max")))


DASHBOARD = {
    "loss": {"train and validation loss": _lines("train/loss", "val/loss"), "grad norm": _lines("train/grad_norm")},
    "throughput": {
        "tokens/s": _lines("perf/tokens_per_s"),
        "MFU": _lines("perf/mfu"),
        "data wait share": _lines("perf/data_wait_frac"),
    },
    "cluster": {
        "step time (min/median/max rank)": _spread("step_time_s"),
        "busy time": _spread("busy_s"),
        "rank of the slowest": _lines("cluster/busy_s_max_rank", "cluster/step_time_s_max_rank"),
        "data wait": _spread("data_wait_s"),
        "RSS GB": _spread("rss_gb"),
        "device GB": _spread("device_gb"),
        "last save s": _spread("save_s"),
        "stragglers": _lines("cluster/stragglers"),
    },
    "goodput": {
        "seconds": _lines(
            *(
                f"goodput/{k}_s"
                for k in ("wall", "startup", "steps", "data_wait", "validation", "checkpoint", "other", "lost")
            )
        ),
        "goodput (steps / wall)": _lines("goodput/goodput"),
    },
}
"""The custom-scalars layout written with a fresh run: ``shardforge tensorboard`` opens on these four panels."""


class Throughput:
    """Tokens/s and MFU from step times, with FLOPs per token from ``training.model.flops``."""

    def __init__(self, flops_per_token: float, peak_flops: float):
        self.flops_per_token, self.peak = flops_per_token, peak_flops

    def of(self, m: StepMetrics) -> tuple[float, float]:
        tps = m.tokens / max(m.step_time_s, 1e-9)
        return tps, tps * self.flops_per_token / self.peak


class ConsoleLog(Callback):
    def __init__(self, interval: int, throughput: Throughput, enabled: bool, printer=print):
        self.interval, self.tp, self.enabled, self.print = interval, throughput, enabled, printer
        self._t0 = time.perf_counter()

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        if not self.enabled or (m.step % self.interval and m.step != trainer.max_steps):
            return
        tps, mfu = self.tp.of(m)
        eta = (trainer.max_steps - m.step) * m.step_time_s
        gn = f"{m.grad_norm:.3f}" if m.grad_norm is not None else "-"
        mem = memory_gb()
        mem_text = (
            f"gpu mem {mem['max_allocated_gb']:.2f} GB" if "max_allocated_gb" in mem else f"mem {mem['rss_gb']:.2f} GB"
        )
        self.print(
            f"step {m.step:>6}/{trainer.max_steps} | loss {m.loss:.4f} | lr {m.lr:.3e} | grad_norm {gn} | "
            f"{tps:,.0f} tok/s | mfu {100 * mfu:.2f}% | step {m.step_time_s * 1000:.0f} ms | "
            f"data {100 * m.data_wait_s / max(m.step_time_s, 1e-9):.1f}% | {mem_text} | "
            f"eta {eta / 60:.1f} min" + (" | SKIPPED (non-finite)" if m.skipped else ""),
            flush=True,
        )


class TensorBoardLogger(Callback):
    """Scalars under stable tags; the resolved config as text once, on a fresh (not resumed) run.

    Each step's scalars are one event, handed to the writer's thread ``hand_over_steps`` steps at a time (or after
    ``hand_over_s`` seconds, and at the end): each hand-over wakes that thread, whose pure-Python CRC-32C then takes
    the GIL from the step (~0.3 ms a step here, handed over every step). Memory is read at each hand-over."""

    hand_over_steps, hand_over_s = 10, 10.0

    def __init__(self, log_dir: str, config_yaml: str, enabled: bool, throughput: Throughput):
        self.enabled, self.tp = enabled, throughput
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # a few hundred bytes an event: a queue of 1,000 takes a hand-over without blocking the step
            self.writer = SummaryWriter(log_dir=log_dir, max_queue=1000)
        self.config_yaml = config_yaml
        self._pending: list[tuple[int, dict[str, float]]] = []
        self._handed_at = time.monotonic()

    def on_train_start(self, trainer: Trainer) -> None:
        if self.writer is not None and trainer.state.step == 0:
            self.writer.add_text("config", "```\n" + self.config_yaml + "\n```", global_step=0)
            self.writer.add_custom_scalars(DASHBOARD)

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        if self.writer is None:
            return
        tps, mfu = self.tp.of(m)
        values = {"train/lr": m.lr, "train/skipped_steps": trainer.state.skipped_steps}
        if math.isfinite(m.loss):
            values["train/loss"] = m.loss
        if m.grad_norm is not None and math.isfinite(m.grad_norm):
            values["train/grad_norm"] = m.grad_norm
        values |= {"perf/tokens_per_s": tps, "perf/mfu": mfu, "perf/step_time_s": m.step_time_s}
        values["perf/data_wait_frac"] = m.data_wait_s / max(m.step_time_s, 1e-9)
        self._pending.append((m.step, values))
        now = time.monotonic()
        if len(self._pending) >= self.hand_over_steps or now - self._handed_at >= self.hand_over_s:
            self.hand_over()

    def hand_over(self) -> None:
        """Queue the pending steps' events for the writer's thread (the last one with the process's memory)."""
        if self.writer is None or not self._pending:
            return
        self._pending[-1][1].update({f"mem/{k}": v for k, v in memory_gb().items()})
        for step, values in self._pending:
            self.scalars(values, step)
        self._pending, self._handed_at = [], time.monotonic()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Many scalars in one event."""
        if self.writer is not None:
            from tensorboard.compat.proto.summary_pb2 import Summary

            summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
            self.writer.file_writer.add_summary(summary, step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.hand_over()
            self.writer.flush()
            self.writer.close()


class Validation(Callback):
    """Validation loss every ``interval`` steps (and at the end); early stopping after ``patience`` evaluations
    without improvement."""

    def __init__(
        self,
        interval: int,
        batches,
        tb: TensorBoardLogger | None,
        patience: int | None,
        printer=None,
        min_delta: float = 0.0,
    ):
        self.interval, self.batches, self.tb = interval, batches, tb
        self.patience, self.print, self.min_delta = patience, printer, min_delta
        self.best = math.inf
        self.bad_evals = 0
        self.history: list[tuple[int, float]] = []
        self.timer = None  # called with ("validation", seconds) after each evaluation (goodput)

    def evaluate(self, trainer: Trainer, step: int) -> float:
        t0 = time.perf_counter()
        with heartbeat.long_phase(step):
            loss = trainer.engine.eval_loss(self.batches())
        if self.timer is not None:
            self.timer("validation", time.perf_counter() - t0)
        self.history.append((step, loss))
        if self.tb is not None:
            self.tb.scalar("val/loss", loss, step)
            self.tb.scalar("val/ppl", math.exp(min(loss, 50.0)), step)
        if self.print:
            self.print(f"step {step:>6} | validation loss {loss:.4f} | ppl {math.exp(min(loss, 50.0)):.2f}", flush=True)
        return loss

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        if m.step % self.interval and m.step != trainer.max_steps:
            return
        loss = self.evaluate(trainer, m.step)
        if loss < self.best - self.min_delta:
            self.best, self.bad_evals = loss, 0
        else:
            self.bad_evals += 1
        if self.patience is not None and self.bad_evals >= self.patience:
            trainer.stop(
                f"early stopping: validation loss did not improve for {self.bad_evals} evaluations "
                f"(best {self.best:.4f})"
            )

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evals": self.bad_evals, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]
        self.history = [tuple(x) for x in state["history"]]


class Checkpointing(Callback):
    """Saves every ``interval`` steps and at the end; on SIGTERM/SIGUSR1 (on any rank) saves and stops the run
    as preempted; with ``exit_interval`` saves and stops after that many steps of this run."""

    def __init__(
        self,
        manager,
        engine,
        stateful: dict,
        interval: int,
        exit_interval: int | None,
        preemption=None,
        group=None,
        device: torch.device | None = None,
    ):
        from training.preemption import Preemption

        self.manager, self.engine, self.stateful = manager, engine, stateful
        self.interval, self.exit_interval, self.group = interval, exit_interval, group
        self.device = device if device is not None else torch.device("cpu")
        self.signal = preemption if preemption is not None else Preemption().install()
        self.preempted = False
        self.exited_early = False  # stopped by train.exit_interval before max_steps: resumable, like a preemption
        self.last_saved: int | None = None
        self._start_step: int | None = None
        self.timer = None  # called with ("checkpoint", blocked seconds) after each save (goodput)

    def _any_rank_signalled(self) -> bool:
        import torch.distributed as dist

        if dist.get_world_size(self.group) == 1:
            return bool(self.signal.signum)
        flag = torch.tensor([1 if self.signal.signum else 0], device=self.device)  # the layout's device
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def on_train_start(self, trainer: Trainer) -> None:
        self._start_step = trainer.state.step

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        preempt = self._any_rank_signalled()
        done_here = self.exit_interval is not None and m.step - self._start_step >= self.exit_interval
        if preempt or done_here or m.step % self.interval == 0 or m.step >= trainer.max_steps:
            t0 = time.perf_counter()
            with heartbeat.long_phase(m.step):
                self.manager.save(m.step, self.engine, self.stateful)
            self.last_saved = m.step
            if self.timer is not None:
                self.timer("checkpoint", time.perf_counter() - t0)
        if preempt:
            self.preempted = True
            trainer.stop(f"preempted by a signal at step {m.step}; checkpoint saved, please requeue")
        elif done_here:
            self.exited_early = m.step < trainer.max_steps
            trainer.stop(f"train.exit_interval={self.exit_interval} reached at step {m.step}; checkpoint saved")

    def on_train_end(self, trainer: Trainer) -> None:
        self.manager.wait()  # an asynchronous save must be on disk before the run ends


class Heartbeat(Callback):
    """Tells the rank's supervisor (:mod:`launcher.supervise`) that a step ended; put it first among the callbacks.
    Steps and callbacks run under the step timeout (a collective in a callback that hangs is found as soon as one in
    a step); validations and checkpoint saves mark themselves (:func:`training.preemption.long_phase`)."""

    def on_train_start(self, trainer: Trainer) -> None:
        heartbeat.beat(heartbeat.STEP, trainer.state.step)

    def on_step_end(self, trainer: Trainer, m: StepMetrics) -> None:
        heartbeat.beat(heartbeat.STEP, m.step)

    def on_train_end(self, trainer: Trainer) -> None:
        heartbeat.beat(heartbeat.PHASE, trainer.state.step)  # the end: results, barrier, shutdown
