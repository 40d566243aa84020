"""Read a checkpoint's weights without DeepSpeed: the one place eval, export, init and consolidate load from.

:func:`ready_weights` reassembles the canonical TP slices of a verified checkpoint into full fp32 weights (the
layer-list names of ``training.model.names``), or reads a consolidated, pruned or int8 folder, and merges LoRA
adapters unless asked not to. :func:`run_config` reads only the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import IntegrityError
from training.checkpoint.canonical import CanonicalReader
from training.checkpoint.format import FORMAT, check_checkpoint, read_manifest
from training.checkpoint.shards import full_tensors


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint root (then its ``latest``)."""
    p = Path(path)
    if (p / "latest").is_file() and not (p / "manifest.json").exists():
        target = (p / "latest").read_text().strip()
        if not (p / target).is_dir():
            raise IntegrityError(
                f"{p / 'latest'} names '{target}', which does not exist in {p}",
                fix="give a step_N folder of it, or write the name of an existing one into 'latest'",
            )
        p = p / target
    if not p.is_dir():
        raise IntegrityError(f"checkpoint '{path}' does not exist", fix="give a step_N folder or its parent")
    return p


def folder_weights(p: Path) -> tuple[dict, dict, int, str | None] | None:
    """A consolidated, pruned or int8 folder (config.json + model[-int8].safetensors): fp32 weights (int8 ones
    dequantized), run config, step and int8 mode; None when ``p`` is not such a folder."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    files = [p / "model.safetensors", p / "model-int8.safetensors"]
    found = next((f for f in files if f.is_file()), None)
    if found is None or not (p / "config.json").is_file():
        return None
    with safe_open(str(found), "pt") as f:
        meta = f.metadata() or {}
    try:
        stored = load_file(str(found))
    except Exception as e:
        raise IntegrityError(f"{found} is not a readable safetensors file: {e}") from None
    weights = {
        k: (t.float() * stored[k + ".scale"][:, None] if t.dtype == torch.int8 else t)
        for k, t in stored.items()
        if not k.endswith(".scale")
    }
    mode = meta.get("mode") if found.name == "model-int8.safetensors" else None
    return weights, json.loads((p / "config.json").read_text()), int(meta.get("step", 0)), mode


def run_config(path: str | Path) -> dict:
    """The run config (a dict) of a checkpoint (folder or root) or of a consolidated, pruned or int8 folder,
    without reading any weights."""
    p = Path(path)
    if (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text())
    return json.loads((resolve(p) / "trainer.json").read_text())["config"]


def data_identity(path: str | Path) -> dict:
    """What a checkpoint records of its training data (tokenizer sha256, sample length); empty for a
    consolidated, pruned or int8 folder, or a checkpoint saved before it was recorded."""
    p = Path(path)
    if (p / "config.json").is_file():
        return {}
    return json.loads((resolve(p) / "trainer.json").read_text()).get("data_identity") or {}


def full_weights(path: str | Path) -> tuple[dict, dict, int]:
    """A verified checkpoint's full fp32 weights (layer-list names), its run config (a dict) and its step; also
    reads consolidated, pruned and int8 folders."""
    folder = folder_weights(Path(path))
    if folder is not None:
        return folder[:3]
    p = resolve(path)
    problems = check_checkpoint(p)  # format 2's model files are verified chunk by chunk as they are read
    if problems:
        raise IntegrityError(f"checkpoint {p} does not verify: {problems[0]}", fix="use another step_N folder")
    trainer = json.loads((p / "trainer.json").read_text())
    cfg, lay = trainer["config"], trainer["layout"]
    gated = cfg["model"]["activation"] == "swiglu"
    manifest = read_manifest(p)
    if manifest.get("format") == FORMAT:
        try:
            tensors = full_tensors(p, manifest["files"], lay["tp"], gated)
        except IntegrityError as e:
            raise IntegrityError(f"checkpoint {p} does not verify: {e}", fix="use another step_N folder") from None
    else:
        reader = CanonicalReader(p / "model", lay["tp"])
        tensors = {k.split("/", 1)[1]: reader.full(k, gated) for k in sorted(reader.files) if k.startswith("param/")}
    return tensors, cfg, trainer["trainer"]["step"]


@dataclass
class Weights:
    """Full fp32 weights ready to use, the run config (a dict) they were trained with, the step, and the int8
    mode of an int8 folder (None otherwise)."""

    tensors: dict[str, torch.Tensor]
    config: dict
    step: int
    int8_mode: str | None = None


def ready_weights(path: str | Path, merge_lora: bool = True) -> Weights:
    """A checkpoint's (or consolidated, pruned or int8 folder's) full weights, LoRA adapters merged into their
    matrices (and the config's ``lora.rank`` set to 0) unless ``merge_lora`` is False."""
    folder = folder_weights(Path(path))
    tensors, cfg, step = folder[:3] if folder is not None else full_weights(path)
    lora = cfg.get("lora") or {}
    if merge_lora and lora.get("rank"):
        from training.model.lora import merge

        tensors = merge(tensors, lora["alpha"] / lora["rank"])
        cfg = {**cfg, "lora": {**lora, "rank": 0}}
    return Weights(tensors, cfg, step, folder[3] if folder is not None else None)
