"""User-facing errors and exit codes: the one place that maps a failure to a one-line message.

Leaf module: imports nothing from the project, so every package may raise these.
The CLI catches :class:`ShardforgeError`, prints ``error: <message>`` on one line and exits with ``exit_code``.
"""

from __future__ import annotations

# Exit codes (documented in README "Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: a traceback is printed
EXIT_USAGE = 2  # bad config, bad command line, bad input data
EXIT_INTEGRITY = 3  # a corrupt or mismatched shard, tokenizer or checkpoint
EXIT_GATE = 4  # the regression gate refused to promote a new model
EXIT_REQUEUE = 75  # (EX_TEMPFAIL) checkpointed after a signal: please requeue
EXIT_HANG = 76  # no heartbeat within the watchdog's timeout: stacks dumped, the rank killed


class ShardforgeError(Exception):
    """An error a user can fix. The message is one line: what, where, and the fix."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, fix: str | None = None):
        text = " ".join(message.split())
        if fix:
            text = f"{text} (fix: {' '.join(fix.split())})"
        super().__init__(text)


class ConfigError(ShardforgeError):
    """A config file or override is invalid: unknown key, wrong type, inconsistent values."""


class DataError(ShardforgeError):
    """Input data cannot be used: empty corpus, unreadable file, bad encoding, occupied output directory."""


class StorageError(ShardforgeError):
    """A file cannot be written: a full disk, a read-only folder, a path taken by a file."""


class IntegrityError(ShardforgeError):
    """A file does not match its manifest: corrupt shard, wrong tokenizer, damaged checkpoint."""

    exit_code = EXIT_INTEGRITY
