"""The checkpoint folder's format: its name, its manifest, and how to verify it (the one owner of both).

A checkpoint is a folder ``step_NNNNNNNN/``::

    manifest.json                 every file's size and sha256, the step and layout (written last)
    trainer.json                  trainer counters, LR schedule, loader position, validation and guard state,
                                  optimizer step, the resolved config and the layout
    model/tp{T}_pp{P}.safetensors the canonical model and optimizer state (``training.checkpoint.canonical``)
    rng/rank{R}.safetensors       each rank's RNG states
"""

from __future__ import annotations

import json
from pathlib import Path

from core.files import fsync_file, sha256_file

FORMAT = "shardforge-checkpoint/1"


def write_manifest(folder: Path, manifest: dict) -> None:
    """``folder/manifest.json``, fsynced (the checkpoint folder is renamed into place after it)."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    fsync_file(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def verify_checkpoint(path: Path) -> list[str]:
    """One line per problem with a checkpoint folder (empty when every file matches its manifest)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return [f"{path}: no manifest.json (incomplete checkpoint)"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return [f"{manifest_path}: not a valid checkpoint manifest"]
    problems = []
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != meta["bytes"]:
            problems.append(f"{f}: size {f.stat().st_size} != manifest {meta['bytes']}")
        elif sha256_file(f) != meta["sha256"]:
            problems.append(f"{f}: sha256 does not match the manifest (corrupt)")
    return problems


def read_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())
