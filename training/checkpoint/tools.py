"""``shardforge checkpoint inspect | consolidate``: look into a checkpoint, or turn it into one weights file.

``consolidate`` writes the full fp32 weights (the layer-list names, e.g.
``1.layer.self_attention.linear_qkv.weight``) into ``model.safetensors`` plus the run's ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from training.checkpoint.format import read_manifest, verify_checkpoint
from training.checkpoint.reader import ready_weights, resolve


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


def consolidate(path: str | Path, out: str | Path, merge_lora: bool = False) -> Path:
    """One fp32 safetensors file of full weights plus the run's config.json, usable anywhere."""
    w = ready_weights(path, merge_lora)
    tensors, cfg, step = w.tensors, w.config, w.step
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out / "model.safetensors"),
        metadata={"step": str(step), "format": "shardforge-consolidated/1"},
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out
