"""``shardforge checkpoint inspect | verify | consolidate``: look into a checkpoint without DeepSpeed.

``consolidate`` reassembles the canonical TP slices into one fp32 safetensors file of full weights (the names of
the layer list, e.g. ``1.layer.self_attention.linear_qkv.weight``) plus the run's config, usable anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.errors import IntegrityError
from training.canonical import CanonicalReader
from training.checkpoint import read_manifest, verify_checkpoint


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint root (then its ``latest``)."""
    p = Path(path)
    if (p / "latest").is_file() and not (p / "manifest.json").exists():
        p = p / (p / "latest").read_text().strip()
    if not p.is_dir():
        raise IntegrityError(f"checkpoint '{path}' does not exist", fix="give a step_N folder or its parent")
    return p


def inspect(path: str | Path) -> str:
    p = resolve(path)
    problems = verify_checkpoint(p)
    manifest = read_manifest(p) if (p / "manifest.json").is_file() else {}
    trainer = json.loads((p / "trainer.json").read_text()) if (p / "trainer.json").is_file() else {}
    lay = manifest.get("layout", {})
    size = sum(f["bytes"] for f in manifest.get("files", {}).values())
    lines = [
        f"checkpoint {p}",
        f"  step {manifest.get('step')}  tokens seen {trainer.get('trainer', {}).get('tokens_seen')}",
        f"  layout tp={lay.get('tp')} pp={lay.get('pp')} dp={lay.get('dp')} zero={lay.get('zero_stage')} "
        f"world={lay.get('world')}",
        f"  {len(manifest.get('files', {}))} files, {size / 1e6:.2f} MB",
        f"  loader position {trainer.get('loader', {}).get('position')}  lr step "
        f"{trainer.get('schedule', {}).get('last_step')}",
        "  verification: " + ("OK" if not problems else f"{len(problems)} problem(s): {problems[0]}"),
    ]
    return "\n".join(lines)


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


def full_weights(path: str | Path) -> tuple[dict, dict, int]:
    """A verified checkpoint's full fp32 weights (layer-list names), its run config (a dict) and its step; also
    reads consolidated, pruned and int8 folders."""
    folder = folder_weights(Path(path))
    if folder is not None:
        return folder[:3]
    p = resolve(path)
    problems = verify_checkpoint(p)
    if problems:
        raise IntegrityError(f"checkpoint {p} does not verify: {problems[0]}", fix="use another step_N folder")
    trainer = json.loads((p / "trainer.json").read_text())
    cfg, lay = trainer["config"], trainer["layout"]
    gated = cfg["model"]["activation"] == "swiglu"
    reader = CanonicalReader(p / "model", lay["tp"])
    tensors = {k.split("/", 1)[1]: reader.full(k, gated) for k in sorted(reader.files) if k.startswith("param/")}
    return tensors, cfg, trainer["trainer"]["step"]


def consolidate(path: str | Path, out: str | Path, merge_lora: bool = False) -> Path:
    tensors, cfg, step = full_weights(path)
    lora = cfg.get("lora", {})
    if merge_lora and lora.get("rank"):
        from training.lora import merge

        tensors = merge(tensors, lora["alpha"] / lora["rank"])
        cfg = {**cfg, "lora": {**lora, "rank": 0}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"step": str(step), "format": "shardforge-consolidated/1"},
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out
