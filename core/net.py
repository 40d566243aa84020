"""Local networking helpers: a free TCP port on the loopback interface for a rendezvous."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (ports it hands to outgoing connections and to bind(0))."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the caller binds it soon after), chosen at random below the
    kernel's ephemeral range: a port from bind(0) is free only until the kernel gives the same number to one of the
    many connections other processes open in the seconds before the rendezvous binds it (ranks still import), and
    it never gives out these on its own."""
    top = _ephemeral_start()
    rng = random.SystemRandom()  # not the seeded module state: two processes must not draw the same sequence
    tries = 64 if top - LOWEST > 1000 else 0  # a kernel whose ephemeral range starts low: bind(0) alone
    for _ in range(tries):
        port = rng.randrange(LOWEST, top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
