"""Checks before fine-tuning: a base model to start from, and data tokenized with that model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from launcher.config import RunConfig
from launcher.errors import ConfigError


def base_tokenizer_sha(spec: str) -> str | None:
    """The sha256 of the tokenizer a ``ckpt:`` base model was trained with (None when it cannot be found)."""
    if not spec.startswith("ckpt:"):
        return None
    from training.consolidate import run_config

    manifest = Path(run_config(spec[len("ckpt:") :])["data"]["output_dir"]) / "manifest.json"
    return json.loads(manifest.read_text())["tokenizer"]["sha256"] if manifest.is_file() else None


def check_finetune(cfg: RunConfig) -> None:
    if not cfg.model.init_from:
        raise ConfigError("finetune needs a base model", fix="set model.init_from=ckpt:DIR or model.init_from=hf:DIR")
    base = base_tokenizer_sha(cfg.model.init_from)
    data = Path(cfg.data.output_dir) / "manifest.json"
    if base and data.is_file() and json.loads(data.read_text())["tokenizer"]["sha256"] != base:
        raise ConfigError(
            f"the dataset {cfg.data.output_dir} was tokenized with another tokenizer than the base model "
            f"{cfg.model.init_from}",
            fix="prepare the domain data with tokenizer.model_file set to the base dataset's tokenizer/tokenizer.model",
        )
