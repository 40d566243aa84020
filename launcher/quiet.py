"""Quiet by default: the known third-party notices that say nothing to a Shardforge user are filtered at the entry
points (the CLI and each rank), so what remains on screen is Shardforge's own progress, log lines and errors.
``shardforge --verbose ...`` or ``SHARDFORGE_VERBOSE=1`` shows them (spawned ranks inherit the variable)."""

from __future__ import annotations

import os
import warnings

VERBOSE_ENV = "SHARDFORGE_VERBOSE"

# (category, message regex, module regex) of notices known to be harmless here
KNOWN_NOTICES = [
    # megatron-core at import: "Apex is not installed", "Transformer Engine and Apex are not installed", and the
    # cuda_graph_scope deprecation of its own default config
    (UserWarning, "", r"megatron\."),
    # DeepSpeed's ZeRO gathers call a torch collective that torch 2.13 marks deprecated
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated", ""),
]


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_third_party() -> None:
    """Install the filters unless verbose output was asked for."""
    if verbose():
        return
    for category, message, module in KNOWN_NOTICES:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
