"""The heartbeat a training rank gives its supervisor (:mod:`launcher.supervise`): shared memory, no I/O.

The supervisor creates the heartbeat before it forks the rank; the rank writes (beat count, step, phase) at each
step boundary, the supervisor reads it every ``watchdog.poll_s`` and times, on its own clock, how long the count
has not moved (no clock is compared across processes). No project imports and no torch: the supervisor imports it
before it forks. Without a supervisor (``watchdog.enabled: false``) :func:`beat` does nothing.
"""

from __future__ import annotations

import mmap
import struct
import time

STARTUP, STEP, PHASE, DONE = 0, 1, 2, 3
"""STEP: between steps (``watchdog.step_timeout_s``); STARTUP and PHASE (validation, checkpoint saves, the end):
``watchdog.phase_timeout_s``; DONE: no timeout."""
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
