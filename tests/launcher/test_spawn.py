"""The local rank group: torchrun's environment per rank, signals to every rank, one failure stops the rest."""

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
out = sys.argv[1]
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
open(f"{out}/env{os.environ['RANK']}", "w").write(" ".join(os.environ[k] for k in keys))
role = sys.argv[2 + int(os.environ["RANK"])]
if role.startswith("exit"):
    sys.exit(int(role[4:]))
if role == "usr1":
    signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75))
time.sleep(60)
"""


def _group(tmp_path, *roles: str, grace_s: float = 30.0) -> tuple[int, float]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    start = time.time()
    rc = run_local_group([sys.executable, str(script), str(tmp_path), *roles], dict(os.environ), len(roles), grace_s)
    return rc, time.time() - start


def test_every_rank_gets_torchrun_s_environment_and_a_failure_stops_the_others(tmp_path):
    rc, took = _group(tmp_path, "sleep", "exit3", "sleep")
    assert rc == 3 and took < 30  # the sleeping ranks were terminated, not waited for (60 s)
    envs = [(tmp_path / f"env{r}").read_text().split() for r in range(3)]
    assert [e[:4] for e in envs] == [[str(r), str(r), "3", "3"] for r in range(3)]
    assert {e[4] for e in envs} == {"127.0.0.1"} and len({e[5] for e in envs}) == 1  # one rendezvous


def test_all_ranks_succeeding_is_success_and_a_rank_ignoring_sigterm_is_killed(tmp_path):
    assert _group(tmp_path, "exit0", "exit0")[0] == 0
    script = tmp_path / "stubborn.py"
    script.write_text("import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "sys.exit(5) if os.environ['RANK'] == '0' else time.sleep(60)\n")  # fmt: skip
    start = time.time()
    rc = run_local_group([sys.executable, str(script)], dict(os.environ), 2, grace_s=1.0)
    assert rc == 5 and time.time() - start < 30  # SIGKILL after the 1 s grace


def test_a_signal_to_the_spawner_reaches_every_rank(tmp_path):
    # both ranks exit 75 on SIGUSR1 (as training ranks checkpoint and do); the spawner forwards it
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGUSR1)).start()
    rc, took = _group(tmp_path, "usr1", "usr1")
    assert rc == 75 and took < 30
