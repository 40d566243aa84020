"""Slurm batch jobs: write a run's sbatch script from ``slurm/train.sbatch``, submit it, and report its jobs.

Every value that reaches a script is validated here and shell-quoted with :func:`shlex.quote` (``#SBATCH`` lines
are parsed by sbatch with the same quoting rules, except that it treats a backslash as an escape, so backslashes
and newlines are refused). The config a job runs is frozen into ``RUN_DIR/slurm/config.yaml`` at submission, with
every override applied, so a requeued job runs exactly what was submitted.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.config import RunConfig, SlurmConfig
from core.errors import ConfigError, ShardforgeError

_WORD = re.compile(r"^[A-Za-z0-9_.,:+=@-]+$")  # partition, account, qos, gres names
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class SlurmJob:
    """What one batch script needs, after validation."""

    cfg: SlurmConfig
    run_dir: Path
    config_file: Path
    workdir: Path
    world: int
    python: str = sys.executable
    requeue: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    checkpoint_dir: Path | None = None
    """Where ``latest`` is: a crash is requeued only when it is newer than the start."""

    @property
    def tasks_per_node(self) -> int:
        return 1 if self.cfg.launch == "torchrun" else self.world // self.cfg.nodes


SLURM_TIMER_S = 30  # slurmctld's PERIODIC_TIMEOUT: how often it looks at time limits and --signal warnings


def time_limit_s(value: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (the formats sbatch --time takes)."""
    days, _, rest = value.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, sec = (parts + [0, 0])[:3]
    else:
        h, m, sec = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def check_text(key: str, value: str) -> str:
    if any(c in value for c in "\n\r\0\\"):
        raise ConfigError(
            f"{key}={value!r} holds a newline, NUL or backslash, which cannot reach a batch script safely",
            fix=f"choose a {key} without them",
        )
    return value


def _check_word(key: str, value: str | None) -> str | None:
    if value is not None and not _WORD.match(value):
        raise ConfigError(f"{key}={value!r} is not a Slurm name", fix=f"use letters, digits and _.,:+=@- in {key}")
    return value


def check_slurm_config(s: SlurmConfig, world: int | None) -> None:
    """Refuse values that cannot make a correct script, naming the key and the fix."""
    check_text("slurm.job_name", s.job_name)
    for key in ("partition", "account", "qos", "constraint"):
        _check_word(f"slurm.{key}", getattr(s, key))
    if not _TIME.match(s.time):
        raise ConfigError(
            f"slurm.time={s.time!r} is not a Slurm time limit", fix="use minutes, HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00"
        )
    if time_limit_s(s.time) < s.signal_grace_s + SLURM_TIMER_S + 30:
        raise ConfigError(
            f"slurm.time={s.time!r} leaves no room for slurm.signal_grace_s={s.signal_grace_s}: Slurm checks time "
            f"limits every {SLURM_TIMER_S} s, so its warning can come that much early, before the ranks have started",
            fix=f"use a time limit of at least {s.signal_grace_s + SLURM_TIMER_S + 30} s or a smaller signal_grace_s",
        )
    for name in s.env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"slurm.env has the bad variable name {name!r}", fix="use letters, digits and _")
    for key, value in [("slurm.container_image", s.container_image), ("slurm.container_mounts", s.container_mounts)]:
        if value is not None:
            check_text(key, value)
    for i, arg in enumerate(s.srun_args):
        check_text(f"slurm.srun_args[{i}]", arg)
    per_node = s.gpus_per_node or None
    if world is None:  # a job that does not train (data preparation)
        return
    if world % s.nodes:
        raise ConfigError(
            f"parallel.nproc={world} ranks do not divide over slurm.nodes={s.nodes}",
            fix="make parallel.nproc a multiple of slurm.nodes",
        )
    if per_node and world != s.nodes * per_node:
        raise ConfigError(
            f"slurm.nodes={s.nodes} x slurm.gpus_per_node={per_node} = {s.nodes * per_node} GPUs, "
            f"but parallel.nproc={world} ranks",
            fix=f"set parallel.nproc={s.nodes * per_node} (and tp x pp x dp to match) or change the node count",
        )


def quote(value: object) -> str:
    return shlex.quote(str(value))


def _log_path(run_dir: Path) -> str:
    return str(run_dir / "slurm" / "train-%j.out").replace("%j", "\x00j")  # not %x: a job name may hold '/'


def directive_path(path: str) -> str:
    """A path for --output: '%' is Slurm's pattern character, doubled except in the patterns we put there."""
    return path.replace("%", "%%").replace("\x00", "%")


def render(job: SlurmJob) -> str:
    """The batch script for ``job``."""
    s = job.cfg
    optional = [f"#SBATCH --{k}={quote(v)}" for k, v in optional_directives(s)]
    srun = ["--label", f"--cpu-bind={quote(s.cpu_bind)}"]  # --label: each line starts with its task's rank
    if s.container_image:
        srun.append(f"--container-image={quote(s.container_image)}")
        if s.container_mounts:
            srun.append(f"--container-mounts={quote(s.container_mounts)}")
    srun += [quote(a) for a in s.srun_args]
    env = dict(s.env)
    env.update(job.extra_env)
    values = {
        "JOB_NAME": quote(s.job_name),
        "NODES": str(s.nodes),
        "TASKS_PER_NODE": str(job.tasks_per_node),
        "CPUS_PER_TASK": str(s.cpus_per_task),
        "GPU_DIRECTIVE": f"#SBATCH --gpus-per-node={s.gpus_per_node}\n" if s.gpus_per_node else "",
        "TIME": quote(s.time),
        "GRACE": str(s.signal_grace_s),
        "REQUEUE_DIRECTIVE": "requeue" if job.requeue else "no-requeue",
        "WORKDIR": quote(job.workdir),
        "LOG": quote(directive_path(_log_path(job.run_dir))),
        "OPTIONAL_DIRECTIVES": "".join(line + "\n" for line in optional),
        "RUN_DIR": quote(job.run_dir),
        "CKPT_DIR": quote(job.checkpoint_dir or job.run_dir / "checkpoints"),
        "CONFIG": quote(job.config_file),
        "PYTHON": quote(job.python),
        "MAX_RESTARTS": str(s.max_restarts),
        "REQUEUE": "1" if job.requeue else "0",
        "LAUNCH": s.launch,
        "SRUN_FLAGS": " ".join(srun),
        "ENV_EXPORTS": "\n".join(f"export {k}={quote(v)}" for k, v in sorted(env.items())),
    }
    return re.sub(r"\n{3,}", "\n\n", fill_template("train.sbatch", values))


def fill_template(name: str, values: dict[str, str]) -> str:
    """The sbatch template ``slurm/NAME`` (package data) with every ``@@KEY@@`` replaced by ``values[KEY]``; values
    must already be quoted for the shell. A placeholder left unfilled is a bug in this version."""
    from importlib.resources import files

    text = files("slurm").joinpath(name).read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text.replace("USR1@@", ""):
        raise ShardforgeError(f"template slurm/{name} has a placeholder this version does not fill")
    return text


def optional_directives(s: SlurmConfig) -> list[tuple[str, str]]:
    pairs = [("partition", s.partition), ("account", s.account), ("qos", s.qos), ("constraint", s.constraint)]
    out = [(k, v) for k, v in pairs if v]
    if s.exclusive:
        out.append(("exclusive", "user"))
    return out


def prepare_job(cfg: RunConfig, requeue: bool = True) -> SlurmJob:
    """Validate ``cfg`` for Slurm, freeze it into RUN_DIR/slurm/config.yaml and describe the job."""
    world = cfg.parallel.nproc
    check_slurm_config(cfg.slurm, world)
    run_dir = Path(cfg.run_dir).absolute()
    check_text("run_dir", str(run_dir))
    frozen = run_dir / "slurm" / "config.yaml"
    job = SlurmJob(cfg.slurm, run_dir, frozen, Path.cwd(), world, requeue=requeue,
                   checkpoint_dir=Path(cfg.checkpoint.dir).absolute())  # fmt: skip
    check_text("python", job.python)
    check_text("checkpoint.dir", str(job.checkpoint_dir))
    return job


def freeze_config(cfg: RunConfig, job: SlurmJob) -> None:
    from core.files import write_text_atomic

    job.config_file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(job.config_file, cfg.to_yaml())


def sbatch(script: Path, dependency: str | None = None) -> str:
    """Submit ``script``; return the job id. No shell is involved: arguments go to sbatch as a list."""
    cmd = ["sbatch", "--parsable"] + ([f"--dependency={dependency}"] if dependency else []) + [str(script)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ShardforgeError(
            "sbatch not found: this machine is not a Slurm login node",
            fix="run on a login node, or start slurm/local-cluster.sh up and export SLURM_CONF",
        ) from None
    if r.returncode != 0:
        raise ShardforgeError(f"sbatch refused {script}: {r.stderr.strip()}", fix="check the config's slurm section")
    return r.stdout.strip().split(";")[0]


def submit(cfg: RunConfig, chain: int = 1) -> tuple[Path, list[str]]:
    """Write the script into RUN_DIR/slurm/ and submit it (``chain`` > 1: that many afterany-dependent jobs)."""
    from core.files import write_text_atomic

    job = prepare_job(cfg, requeue=chain <= 1)
    freeze_config(cfg, job)
    script = job.run_dir / "slurm" / "train.sbatch"
    write_text_atomic(script, render(job))
    (job.run_dir / "slurm" / "DONE").unlink(missing_ok=True)
    ids: list[str] = []
    for _ in range(chain):
        ids.append(sbatch(script, f"afterany:{ids[-1]}" if ids else None))
        with open(job.run_dir / "slurm" / "jobs.txt", "a") as f:
            f.write(ids[-1] + "\n")
    return script, ids


_STEP_LINE = re.compile(r"step\s+(\d+)/(\d+) \| loss ([0-9.naninf]+)")


def _squeue(ids: list[str]) -> dict[str, tuple[str, str]]:
    """Live jobs among ``ids``: id -> (state, reason). Empty when squeue is missing or knows none of them."""
    if not ids:
        return {}
    try:
        r = subprocess.run(
            ["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i|%T|%r"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    rows = [line.split("|") for line in r.stdout.splitlines() if line.count("|") == 2]
    return {i: (state, reason) for i, state, reason in rows}


def _history(run_dir: Path) -> list[list[str]]:
    path = run_dir / "slurm" / "history.tsv"
    if not path.is_file():
        return []
    return [line.split("\t", 3) for line in path.read_text().splitlines() if line.count("\t") >= 3]


def last_step(run_dir: Path) -> tuple[int, int, float] | None:
    """(step, max_steps, loss) from the last progress line of the run's Slurm logs."""
    found = None
    for log in sorted((run_dir / "slurm").glob("*.out"), key=lambda p: p.stat().st_mtime):
        for m in _STEP_LINE.finditer(log.read_text(errors="replace")):
            found = (int(m.group(1)), int(m.group(2)), float(m.group(3)))
    return found


def status(run_dir: str | Path) -> str:
    """A table of the run's jobs (state, restarts, last event) and its last logged step and loss."""
    run_dir = Path(run_dir).absolute()
    jobs_file = run_dir / "slurm" / "jobs.txt"
    if not jobs_file.is_file():
        raise ShardforgeError(
            f"{jobs_file} not found: no job was submitted for this run",
            fix="submit with `shardforge slurm submit -c FILE`, or pass the run directory",
        )
    ids = jobs_file.read_text().split()
    live = _squeue(ids)
    events: dict[str, list[list[str]]] = {}
    for row in _history(run_dir):
        events.setdefault(row[1], []).append(row)
    lines = [f"run {run_dir}", f"{'job':>8}  {'state':<12}{'restarts':>9}  last event"]
    for i in ids:
        ev = events.get(i, [])
        restarts = max((int(e[2]) for e in ev), default=0)
        last = f"{ev[-1][0]} {ev[-1][3]}" if ev else "-"
        if i in live:
            state, reason = live[i]
            state = state if reason in ("None", "") else f"{state} ({reason})"
        else:
            state = _final_state(ev)
        lines.append(f"{i:>8}  {state:<12}{restarts:>9}  {last}")
    step = last_step(run_dir)
    lines.append(f"last step {step[0]}/{step[1]}, loss {step[2]:.4f}" if step else "no training step logged yet")
    lines += goodput_lines(run_dir)
    if (run_dir / "slurm" / "DONE").exists():
        lines.append("training finished")
    return "\n".join(lines)


def goodput_lines(run_dir: Path) -> list[str]:
    """Where the run's time went, over all its starts (RUN_DIR/goodput.json, written by the training ranks)."""
    import json

    path = run_dir / "goodput.json"
    if not path.is_file():
        return []
    good = json.loads(path.read_text())
    t = good["totals"]
    parts = ", ".join(f"{k} {t[k + '_s'] / 60:.1f}" for k in ("steps", "startup", "checkpoint", "validation",
                                                               "data_wait", "lost", "other"))  # fmt: skip
    return [f"goodput {100 * t['goodput']:.1f}% of {t['wall_s'] / 60:.1f} min over {len(good['starts'])} starts "
            f"(minutes: {parts})"]  # fmt: skip


def _final_state(events: list[list[str]]) -> str:
    if not events:
        return "UNKNOWN"
    last = events[-1][3]
    if last.startswith(("finished", "skipped")):
        return "COMPLETED"
    if last.startswith("checkpointed: chain"):
        return "CHECKPOINTED"
    if last == "started" or last.startswith("started") or last == "requeued":
        return "ENDED"  # gone from squeue without a final record: killed (e.g. past the time limit)
    return "FAILED"
