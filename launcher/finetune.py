"""Checks before fine-tuning: a base model to start from, and data tokenized with that model's tokenizer."""

from __future__ import annotations

from pathlib import Path

from core.config import RunConfig
from core.errors import ConfigError


def base_tokenizer_sha(spec: str) -> str | None:
    """The sha256 of the tokenizer a ``ckpt:`` base model was trained with (None for a Hugging Face base, whose
    tokenizer is the user's to match). A checkpoint records it (trainer.json's ``data_identity``); otherwise the
    base run's dataset manifest tells. When neither can be read, the check cannot be made: that is an error."""
    if not spec.startswith("ckpt:"):
        return None
    from data_pipeline.manifest import MANIFEST, read_manifest
    from training.checkpoint.reader import data_identity, run_config

    base = spec[len("ckpt:") :]
    recorded = data_identity(base).get("tokenizer_sha256")
    if recorded:
        return recorded
    data_dir = Path(run_config(base)["data"]["output_dir"])
    if not (data_dir / MANIFEST).is_file():
        raise ConfigError(
            f"cannot tell which tokenizer the base model {base} was trained with: its dataset {data_dir} holds no "
            f"{MANIFEST}",
            fix="make the base's dataset reachable at that path (the fine-tuning data must use its tokenizer)",
        )
    return read_manifest(data_dir)["tokenizer"]["sha256"]


def check_finetune(cfg: RunConfig) -> None:
    if not cfg.model.init_from:
        raise ConfigError("finetune needs a base model", fix="set model.init_from=ckpt:DIR or model.init_from=hf:DIR")
    from data_pipeline.manifest import MANIFEST, read_manifest

    base = base_tokenizer_sha(cfg.model.init_from)
    data = Path(cfg.data.output_dir)
    if base and (data / MANIFEST).is_file() and read_manifest(data)["tokenizer"]["sha256"] != base:
        raise ConfigError(
            f"the dataset {cfg.data.output_dir} was tokenized with another tokenizer than the base model "
            f"{cfg.model.init_from}",
            fix="prepare the domain data with tokenizer.model_file set to the base dataset's tokenizer/tokenizer.model",
        )
