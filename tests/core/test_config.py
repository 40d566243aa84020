"""Config loading: unknown keys, wrong types, layout consistency, overrides and interpolation."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from core.config import load_config, validate_config
from core.errors import ConfigError


def write(tmp_path, data) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    path = write(tmp_path, {"train": {"max_stepz": 10}})
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.max_stepz" in msg and path in msg and "max_steps" in msg
    assert "\n" not in msg


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, {"train": {"max_steps": "lots"}})
    with pytest.raises(ConfigError, match=r"train\.max_steps.*'lots'"):
        load_config(path)


def test_layout_product_must_equal_world_size(tmp_path):
    path = write(tmp_path, {"parallel": {"nproc": 4, "tp": 2, "pp": 1, "dp": 3}})
    with pytest.raises(ConfigError, match=r"tp=2 x parallel.pp=1 x parallel.dp=3 = 6.*nproc=4"):
        load_config(path)


@pytest.mark.parametrize(
    "sections, pattern",
    [
        ({"parallel": {"nproc": 3, "tp": 3}, "model": {"hidden_size": 120}}, r"num_attention_heads=4.*tp=3"),
        ({"parallel": {"nproc": 2, "pp": 2}, "model": {"num_layers": 3}}, r"num_layers=3.*pp=2"),
        ({"parallel": {"nproc": 2, "pp": 2, "zero_stage": 2}}, r"zero_stage=2.*pp=2"),
        ({"parallel": {"nproc": 2, "tp": 2}, "model": {"arch": "lstm"}}, r"arch=lstm supports only data"),
        ({"parallel": {"nproc": 2}, "train": {"global_batch_size": 6, "micro_batch_size": 4}}, r"global_batch"),
        ({"data": {"split": [0.5, 0.2, 0.2]}}, r"data.split"),
    ],
)
def test_inconsistent_values_are_refused(sections, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_config(sections, "x.yaml")


def test_dp_defaults_to_world_over_tp_pp():
    cfg = validate_config({"parallel": {"nproc": 4, "tp": 2}, "train": {"global_batch_size": 8}})
    assert cfg.resolved_dp() == 2


def test_overrides_and_run_dir_interpolation(tmp_path):
    path = write(tmp_path, {"run_dir": "runs/a", "train": {"max_steps": 5}})
    cfg = load_config(path, ["train.max_steps=100", "optim.lr=0.01", "run_dir=runs/b", "data.split=[0.9,0.05,0.05]"])
    assert cfg.train.max_steps == 100 and cfg.optim.lr == 0.01
    assert cfg.data.output_dir == "runs/b/data" and cfg.checkpoint.dir == "runs/b/checkpoints"
    assert cfg.data.split == (0.9, 0.05, 0.05)
    cfg = load_config(path, ["slurm.job_name=a #b: c", "slurm.time=30", "run_dir='quoted'"])
    assert cfg.slurm.job_name == "a #b: c" and cfg.slurm.time == "30" and cfg.run_dir == "quoted"


def test_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(write(tmp_path, {}), ["train.max_steps"])
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(write(tmp_path, {}), ["train.nope=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_example_configs_validate():

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)  # raises on any problem
