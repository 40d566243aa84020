"""Preemption signals, recorded from the first moment of a rank's life.

Slurm sends SIGUSR1 (``--signal=USR1@grace``) or SIGTERM (time limit, ``scancel``) to every process of a job step,
possibly while a rank is still importing torch; Ctrl-C sends SIGINT to every local rank. All three mean "save and
stop": a repeated signal changes nothing, so a second Ctrl-C or SIGTERM during the save does not cut it short.
:func:`install` replaces Python's default action (exit) with a flag as early as possible; the checkpointing callback
reads the flag at the next step boundary, saves and stops.
"""

from __future__ import annotations

import signal

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
