"""Preemption signals, recorded from the first moment of a rank's life.

Slurm sends SIGUSR1 (``--signal=USR1@grace``) or SIGTERM (time limit, ``scancel``) to every process of a job step,
possibly while a rank is still importing torch; Ctrl-C sends SIGINT to every local rank. All three mean "save and
stop": a repeated signal changes nothing, so a second Ctrl-C or SIGTERM during the save does not cut it short.
:func:`install` replaces Python's default action (exit) with a flag as early as possible; the checkpointing callback
reads the flag at the next step boundary, saves and stops.

The heartbeat a rank gives its supervisor (:mod:`launcher.supervise`) lives here too: shared memory, no I/O. The
supervisor creates it before it forks the rank; the rank writes (beat count, step, phase) at each step boundary, the
supervisor reads it every ``watchdog.poll_s`` and times, on its own clock, how long the count has not moved. No
torch import: the supervisor imports this module before it forks.
"""

from __future__ import annotations

import mmap
import signal
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preemption:
    def __init__(self) -> None:
        self.signum = 0

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum

    def install(self) -> Preemption:
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self


STARTUP, STEP, PHASE, DONE = 0, 1, 2, 3
"""STEP: steps and the callbacks between them, collectives included (``watchdog.step_timeout_s``); STARTUP and PHASE
(a validation, a checkpoint save, the end): ``watchdog.phase_timeout_s``; DONE: no timeout."""
PHASE_NAMES = {STARTUP: "start-up", STEP: "step", PHASE: "validation/checkpoint", DONE: "done"}
_FORMAT = "<qqi"


class Heartbeat:
    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, struct.calcsize(_FORMAT))  # anonymous and shared: survives fork in both
        self._count = 0
        self.set(STARTUP, 0)
        self._seen, self._since = self.read_raw(), time.monotonic()

    def set(self, phase: int, step: int) -> None:
        self._count += 1
        struct.pack_into(_FORMAT, self._mem, 0, self._count, step, phase)

    def read_raw(self) -> tuple[int, int, int]:
        return struct.unpack_from(_FORMAT, self._mem, 0)

    def read(self) -> tuple[float, int, int]:
        """(seconds since the beat count last moved, step, phase), for the supervisor."""
        raw = self.read_raw()
        if raw != self._seen:
            self._seen, self._since = raw, time.monotonic()
        return time.monotonic() - self._since, raw[1], raw[2]


_current: Heartbeat | None = None


def create() -> Heartbeat:
    global _current
    _current = Heartbeat()
    return _current


def beat(phase: int, step: int) -> None:
    if _current is not None:
        _current.set(phase, step)


@contextmanager
def long_phase(step: int) -> Iterator[None]:
    """A validation or a checkpoint save: the phase timeout inside, the timeout of the phase before it after."""
    before = _current.read_raw()[2] if _current is not None else STEP
    beat(PHASE, step)
    try:
        yield
    finally:
        beat(before, step)
