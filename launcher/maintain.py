"""``shardforge continue``: keep a released model current, and promote a new one only if it is not worse.

1. Train from ``maintain.previous`` (weights only, ``model.init_from=ckpt:``) on the new data (``data.output_dir``)
   blended with a replay share of the old data (``maintain.replay_fraction`` of the samples).
2. The regression gate scores the new model and the previous one on the same fixed evaluation set (by default
   the old dataset's test split, which the content-hash split keeps stable as documents are added) and refuses
   the new one if its loss exceeds the previous loss by more than ``maintain.margin`` (relative).
3. A promoted model is appended to ``RUN_DIR/registry.jsonl``: the model, its parent, the data manifest's sha256,
   the config and the metrics. Every decision is also written to ``RUN_DIR/gate.json``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

from core.config import RunConfig
from core.errors import EXIT_GATE, EXIT_OK, ConfigError


def previous_data_dir(previous: str) -> str:
    from training.checkpoint.reader import run_config

    return run_config(previous)["data"]["output_dir"]


def continue_overrides(cfg: RunConfig) -> list[str]:
    """The overrides that turn ``cfg`` into continued training of ``maintain.previous`` with replay."""
    mt = cfg.maintain
    if not mt.previous:
        raise ConfigError("continue needs the released model", fix="set maintain.previous=PATH (a checkpoint)")
    out = [f"model.init_from=ckpt:{mt.previous}"]
    if mt.replay_fraction > 0:
        old = mt.replay_data or previous_data_dir(mt.previous)
        blend = [
            {"path": cfg.data.output_dir, "weight": 1 - mt.replay_fraction},
            {"path": old, "weight": mt.replay_fraction},
        ]
        out.append("loader.blend=" + json.dumps(blend))
    return out


def _manifest_sha(data_dir: str) -> str:
    return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()


def gate(cfg: RunConfig, candidate: str) -> tuple[bool, dict]:
    """Score ``candidate`` and ``maintain.previous`` on the same evaluation set; promote if not worse by more than
    the margin. Writes RUN_DIR/gate.json, and RUN_DIR/registry.jsonl when promoted."""
    from training.checkpoint.reader import resolve
    from training.inference.evaluate import load_model, split_metrics

    mt = cfg.maintain
    eval_data = mt.eval_data or mt.replay_data or previous_data_dir(mt.previous)
    new = load_model(candidate, eval_data)
    old = load_model(mt.previous, eval_data)
    new_m = split_metrics(new, mt.eval_split, mt.eval_max_samples)
    old_m = split_metrics(old, mt.eval_split, mt.eval_max_samples)
    limit = old_m["loss"] * (1 + mt.margin)
    promoted = new_m["loss"] <= limit
    decision = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(resolve(candidate).absolute()),
        "parent": str(resolve(mt.previous).absolute()),
        "step": new.step,
        "eval": {"data": eval_data, "split": mt.eval_split, "samples": new_m["samples"]},
        "metrics": {
            "loss": new_m["loss"],
            "perplexity": new_m["perplexity"],
            "previous_loss": old_m["loss"],
            "previous_perplexity": old_m["perplexity"],
            "limit": limit,
            "margin": mt.margin,
        },  # fmt: skip
        "promoted": promoted,
    }
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "gate.json").write_text(json.dumps(decision, indent=1))
    if promoted:
        entry = {**decision, "data_manifest_sha256": _manifest_sha(cfg.data.output_dir),
                 "config": cfg.model_dump(mode="json")}  # fmt: skip
        with open(run / "registry.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
    return promoted, decision


def report(promoted: bool, d: dict) -> int:
    m = d["metrics"]
    verdict = "PROMOTED" if promoted else "REFUSED"
    print(f"regression gate: new loss {m['loss']:.4f} vs previous {m['previous_loss']:.4f} "
          f"(limit {m['limit']:.4f} = previous x (1 + {m['margin']})) -> {verdict}")  # fmt: skip
    if promoted:
        print(f"recorded {d['model']} in the registry (parent {d['parent']})")
    return EXIT_OK if promoted else EXIT_GATE
