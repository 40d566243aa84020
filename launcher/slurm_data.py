"""``shardforge data prepare --slurm``: submit the six stages of :mod:`data_pipeline.slurm_stages` as Slurm jobs.

``map``, ``dedup``, ``filter`` and ``pack`` are job arrays of ``slurm.array_tasks`` tasks (a group of input files
or a partition of the dedup records each); ``tokenizer`` and ``finalize`` are single tasks. Each stage
depends on the previous one with ``afterok``, so a failed stage stops the chain and nothing is published.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from core.config import RunConfig
from core.errors import ShardforgeError
from launcher.slurm import check_slurm_config, directive_path, fill_template, optional_directives, quote, sbatch

STAGES = (("map", True), ("dedup", True), ("filter", True), ("tokenizer", False), ("pack", True), ("finalize", False))


def render_stage(cfg: RunConfig, work: Path, stage: str, array: bool, python: str) -> str:
    s = cfg.slurm
    tasks = s.array_tasks
    log = str(work / "logs" / (f"{stage}-%A_%a.out" if array else f"{stage}-%j.out"))
    values = {
        "JOB_NAME": quote(f"{s.job_name}-data-{stage}"),
        "CPUS_PER_TASK": str(s.cpus_per_task),
        "TIME": quote(s.time),
        "WORKDIR": quote(Path.cwd()),
        "LOG": quote(directive_path(log.replace("%A", "\0A").replace("%a", "\0a").replace("%j", "\0j"))),
        "ARRAY_DIRECTIVE": f"#SBATCH --array=0-{tasks - 1}\n" if array else "",
        "OPTIONAL_DIRECTIVES": "".join(f"#SBATCH --{k}={quote(v)}\n" for k, v in optional_directives(s)),
        "PYTHON": quote(python),
        "STAGE": stage,
        "CONFIG": quote(work / "config.yaml"),
        "WORK": quote(work),
        "TASKS": str(tasks),
    }
    return fill_template("prepare.sbatch", values)


def submit_prepare(cfg: RunConfig, overwrite: bool = False) -> tuple[Path, list[str]]:
    """Check the output folder, freeze the config, write one script per stage and submit them chained."""
    import sys

    from core.files import write_text_atomic
    from data_pipeline.prepare import check_output_dir, dataset_fingerprint
    from data_pipeline.slurm_stages import work_dir
    from launcher.slurm import check_text

    check_slurm_config(cfg.slurm, None)
    check_text("data.output_dir", str(Path(cfg.data.output_dir).absolute()))
    if cfg.data.max_documents is not None:
        raise ShardforgeError("data.max_documents is a single-machine trial setting", fix="drop it with --slurm")
    if cfg.data.validation_inputs or cfg.data.test_inputs:
        raise ShardforgeError("data.validation_inputs/test_inputs are not split over Slurm tasks yet",
                              fix="prepare such a dataset without --slurm")  # fmt: skip
    check_output_dir(Path(cfg.data.output_dir), dataset_fingerprint(cfg), overwrite)
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
