"""`shardforge continue`: continued training with replay behind the regression gate."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli as cli
from conftest import small_config, stdlib_files

from core.errors import EXIT_GATE
from data_pipeline.prepare import prepare_dataset


@pytest.fixture(scope="module")
def new_data(prepared, tmp_path_factory):
    """Newer documents, tokenized with the released model's tokenizer."""
    tmp = tmp_path_factory.mktemp("new")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for f in stdlib_files(120)[60:]:
        (corpus / f.name).write_text(f.read_text())
    cfg = small_config(tmp, [str(corpus)], tokenizer={"model_file": str(prepared / "tokenizer" / "tokenizer.model")})
    return prepare_dataset(cfg).output_dir


def _continue(run, new_data, base_model, *extra):
    return cli("continue", "-c", "configs/tiny.yaml", f"run_dir={run}", f"data.output_dir={new_data}",
               f"maintain.previous={base_model / 'checkpoints'}", "maintain.replay_fraction=0.3",
               "maintain.eval_max_samples=32", "train.max_steps=20", "train.eval_interval=20", *extra)  # fmt: skip


def test_gate_promotes_a_better_model_and_refuses_a_worse_one(base_model, new_data, tmp_path):
    good = _continue(tmp_path / "good", new_data, base_model)
    assert good.returncode == 0, good.stderr[-3000:]
    [entry] = [json.loads(line) for line in (tmp_path / "good" / "registry.jsonl").read_text().splitlines()]
    assert entry["promoted"] and entry["metrics"]["loss"] < entry["metrics"]["previous_loss"]
    assert entry["parent"].endswith("step_00000040") and len(entry["data_manifest_sha256"]) == 64
    assert entry["config"]["loader"]["blend"][1]["weight"] == pytest.approx(0.3) and "PROMOTED" in good.stdout
    bad = _continue(tmp_path / "bad", new_data, base_model, "optim.lr=1.0")  # deliberately worse
    assert bad.returncode == EXIT_GATE and "REFUSED" in bad.stdout
    decision = json.loads((tmp_path / "bad" / "gate.json").read_text())
    assert not decision["promoted"] and decision["metrics"]["loss"] > decision["metrics"]["limit"]
    assert not (tmp_path / "bad" / "registry.jsonl").exists()
