"""The training loop: fetch a step's micro-batches, train one step, then callbacks.

Everything else (the log line, TensorBoard, validation and early stopping) hangs off callbacks. The trainer's
own resumable state (step, tokens seen, skipped steps) has ``state_dict()``/``load_state_dict()``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from core.errors import ShardforgeError


class NonFiniteLossError(ShardforgeError):
    """Training produced non-finite losses too many steps in a row."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    step_time_s: float
    data_wait_s: float
    tokens: int
    skipped: bool
    sync_wait_s: float = 0.0
    """Time in the step's own collectives waiting for other ranks (CPU; 0 on GPU)."""


class Callback:
    """Hooks the trainer calls; override what you need."""

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step_end(self, trainer: Trainer, metrics: StepMetrics) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


class Trainer:
    def __init__(
        self,
        engine,
        loader,
        max_steps: int,
        tokens_per_step: int,
        max_consecutive_skips: int,
        callbacks: list[Callback],
    ):
        self.engine, self.loader, self.max_steps = engine, loader, max_steps
        self.tokens_per_step, self.max_skips = tokens_per_step, max_consecutive_skips
        self.callbacks = callbacks
        self.state = TrainState()
        self.should_stop = False
        self.stop_reason = ""
        self.losses: list[float] = []
        self.grad_norms: list[float | None] = []
        self.step_times: list[float] = []

    def stop(self, reason: str) -> None:
        self.should_stop, self.stop_reason = True, reason

    def _guard(self, loss: float) -> bool:
        """Count a non-finite loss as a skipped step; stop with a clear error after too many in a row."""
        if math.isfinite(loss):
            self.state.consecutive_skips = 0
            return False
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        if self.state.consecutive_skips >= self.max_skips:
            raise NonFiniteLossError(
                f"loss was not finite for {self.state.consecutive_skips} steps in a row (last at step "
                f"{self.state.step})",
                fix="lower optim.lr, check the data, or resume from an earlier checkpoint",
            )
        return True

    def train_one_step(self) -> StepMetrics:
        t0 = time.perf_counter()
        batches = self.loader.next_step()
        t1 = time.perf_counter()
        lr = self.engine.lr()  # the rate this step uses (the schedule moves on inside the step)
        loss = self.engine.train_step(batches)
        skipped = self._guard(loss)
        self.state.step += 1
        self.state.tokens_seen += self.tokens_per_step
        grad_norm = self.engine.grad_norm()
        elapsed = time.perf_counter() - t0
        waited = self.engine.take_sync_wait()
        self.losses.append(loss)
        self.step_times.append(elapsed)
        self.grad_norms.append(grad_norm)
        return StepMetrics(self.state.step, loss, lr, grad_norm, elapsed, t1 - t0, self.tokens_per_step, skipped,
                           waited)  # fmt: skip

    def fit(self) -> None:
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.state.step < self.max_steps and not self.should_stop:
            metrics = self.train_one_step()
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
        if not self.stop_reason:
            self.stop_reason = f"reached train.max_steps={self.max_steps}"
        for cb in self.callbacks:
            cb.on_train_end(self)
