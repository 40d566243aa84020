"""``shardforge data prepare --slurm``: submit the four stages of :mod:`data_pipeline.distributed` as Slurm jobs.

``map`` and ``pack`` are job arrays of ``slurm.array_tasks`` tasks (one group of input files each); ``dedup`` and
``finalize`` are single tasks. Each stage depends on the previous one with ``afterok``, so a failed stage stops
the chain and nothing is published.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from launcher.config import RunConfig
from launcher.errors import ShardforgeError
from launcher.slurm import _directive_path, _optional_directives, _q, check_slurm_config, sbatch

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "prepare.sbatch"
STAGES = (("map", True), ("dedup", False), ("pack", True), ("finalize", False))


def render_stage(cfg: RunConfig, work: Path, stage: str, array: bool, python: str) -> str:
    s = cfg.slurm
    tasks = s.array_tasks
    log = str(work / "logs" / (f"{stage}-%A_%a.out" if array else f"{stage}-%j.out"))
    values = {
        "JOB_NAME": _q(f"{s.job_name}-data-{stage}"),
        "CPUS_PER_TASK": str(s.cpus_per_task),
        "TIME": _q(s.time),
        "WORKDIR": _q(Path.cwd()),
        "LOG": _q(_directive_path(log.replace("%A", "\0A").replace("%a", "\0a").replace("%j", "\0j"))),
        "ARRAY_DIRECTIVE": f"#SBATCH --array=0-{tasks - 1}\n" if array else "",
        "OPTIONAL_DIRECTIVES": "".join(f"#SBATCH --{k}={_q(v)}\n" for k, v in _optional_directives(s)),
        "PYTHON": _q(python),
        "STAGE": stage,
        "CONFIG": _q(work / "config.yaml"),
        "WORK": _q(work),
        "TASKS": str(tasks),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    return text


def submit_prepare(cfg: RunConfig, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Check the output folder, freeze the config, write one script per stage and submit them chained."""
    import sys

    from data_pipeline.distributed import work_dir
    from data_pipeline.manifest import write_text_atomic
    from data_pipeline.prepare import _check_output_dir, dataset_fingerprint
    from launcher.slurm import _check_text

    check_slurm_config(cfg.slurm, None)
    _check_text("data.output_dir", str(Path(cfg.data.output_dir).absolute()))
    if cfg.data.max_documents is not None:
        raise ShardforgeError("data.max_documents is a single-machine trial setting", fix="drop it with --slurm")
    _check_output_dir(Path(cfg.data.output_dir), dataset_fingerprint(cfg), overwrite)
    work = work_dir(cfg)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    write_text_atomic(work / "config.yaml", cfg.to_yaml())
    ids: list[str] = []
    for stage, array in STAGES:
        script = work / f"{stage}.sbatch"
        write_text_atomic(script, render_stage(cfg, work, stage, array, sys.executable))
        ids.append(sbatch(script, f"afterok:{ids[-1]}" if ids else None))
    return work, ids


def wait_for_jobs(ids: list[str], poll_s: float = 2.0) -> None:
    """Block until none of ``ids`` is pending or running any more."""
    while True:
        r = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i"], capture_output=True, text=True)
        if r.returncode == 0 and not r.stdout.strip():
            return
        time.sleep(poll_s)
