"""The local rank group: torchrun's environment per rank, signals to every rank, one failure stops the rest.

No timing is assumed: a rank that fails first waits until every rank has written its environment, a signal is sent
once every rank is ready for it, and "stopped, not waited for" is seen as a rank that never finished its 60 s
sleep (it would write ``slept{RANK}``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from launcher.spawn import run_local_group

# each rank writes its environment, then behaves as told for its rank
RANK_SCRIPT = """
import os, signal, sys, time
out, rank, world = sys.argv[1], os.environ["RANK"], int(os.environ["WORLD_SIZE"])
role = sys.argv[2 + int(rank)]
if role == "usr1":
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
if role == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if role == "sleep":  # record that the spawner asked it to stop (SIGTERM), rather than killing it
    signal.signal(signal.SIGTERM, lambda *a: (open(f"{out}/term{rank}", "w").close(), sys.exit(143)))
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
open(f"{out}/env{rank}.tmp", "w").write(" ".join(os.environ[k] for k in keys))
os.replace(f"{out}/env{rank}.tmp", f"{out}/env{rank}")  # ready: handlers installed, environment written
if role.startswith("exit"):
    while sum(os.path.exists(f"{out}/env{r}") for r in range(world)) < world:
        time.sleep(0.05)
    sys.exit(int(role[4:]))
time.sleep(60)
open(f"{out}/slept{rank}", "w").write("the 60 s sleep ended: nobody stopped this rank")
"""


def _group(tmp_path, *roles: str, grace_s: float = 30.0) -> int:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    return run_local_group([sys.executable, str(script), str(tmp_path), *roles], dict(os.environ), len(roles), grace_s)


def _slept(tmp_path, n: int) -> list[int]:
    return [r for r in range(n) if (tmp_path / f"slept{r}").exists()]


def test_every_rank_gets_torchrun_s_environment_and_a_failure_stops_the_others(tmp_path):
    rc = _group(tmp_path, "sleep", "exit3", "sleep")
    assert rc == 3 and _slept(tmp_path, 3) == []  # the sleeping ranks were stopped, not waited for,
    assert [r for r in range(3) if (tmp_path / f"term{r}").exists()] == [0, 2]  # and by SIGTERM first
    envs = [(tmp_path / f"env{r}").read_text().split() for r in range(3)]
    assert [e[:4] for e in envs] == [[str(r), str(r), "3", "3"] for r in range(3)]
    assert {e[4] for e in envs} == {"127.0.0.1"} and len({e[5] for e in envs}) == 1  # one rendezvous


def test_all_ranks_succeeding_is_success_and_a_rank_ignoring_sigterm_is_killed(tmp_path):
    assert _group(tmp_path, "exit0", "exit0") == 0
    assert _group(tmp_path, "exit5", "stubborn", grace_s=1.0) == 5
    assert _slept(tmp_path, 2) == []  # SIGKILL after the 1 s grace, not the end of its sleep


def test_a_signal_to_the_spawner_reaches_every_rank(tmp_path):
    # both ranks exit 75 on SIGUSR1 (as training ranks checkpoint and do); the spawner forwards it once both are
    # ready for it (a rank still starting would die of SIGUSR1's default action)
    def signal_when_ready() -> None:
        forwarding = lambda: getattr(signal.getsignal(signal.SIGUSR1), "__name__", "") == "forward"  # noqa: E731
        while not (forwarding() and all((tmp_path / f"env{r}").exists() for r in range(2))):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=signal_when_ready, daemon=True).start()
    assert _group(tmp_path, "usr1", "usr1") == 75 and _slept(tmp_path, 2) == []


def test_the_rendezvous_port_is_free_and_one_the_kernel_never_hands_out_itself():
    """Below the ephemeral range (a port from bind(0) can be handed to another process's connection before the
    rank binds it: seen as a failed start when two tests ran side by side)."""
    import socket
    from pathlib import Path

    from core.net import free_port

    ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(20)]
    assert len(ports) == 20 and all(1024 < p < ephemeral_start for p in ports), (ports, ephemeral_start)
    assert len(set(ports)) > 1  # drawn at random, not a fixed port
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # free indeed
