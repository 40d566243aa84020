"""The `shardforge` command line as a user meets it: help, one-line errors, exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml
from conftest import REPO

from launcher.errors import EXIT_INTEGRITY, EXIT_USAGE


def sf(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_command():
    out = sf("--help").stdout
    for cmd in ("config", "data"):
        assert cmd in out
    sub = sf("data", "--help").stdout
    for cmd in ("prepare", "inspect", "verify"):
        assert cmd in sub


def test_bad_config_key_is_one_line_naming_key_and_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"seq_lenght": 10}}))
    r = sf("data", "prepare", "-c", cfg)
    assert r.returncode == EXIT_USAGE
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.seq_lenght" in lines[0] and str(cfg) in lines[0] and "seq_length" in lines[0]


def test_config_show_prints_resolved_values_with_overrides():
    r = sf("config", "show", "-c", "configs/quickstart.yaml", "train.max_steps=7")
    cfg = yaml.safe_load(r.stdout)
    assert r.returncode == 0 and cfg["train"]["max_steps"] == 7
    assert cfg["data"]["output_dir"] == "runs/quickstart/data"


def test_inspect_and_verify(prepared, tmp_path):
    r = sf("data", "inspect", prepared)
    assert r.returncode == 0 and "train" in r.stdout and "near_dedup" in r.stdout
    assert sf("data", "verify", prepared).returncode == 0
    copy = tmp_path / "ds"
    shutil.copytree(prepared, copy)
    tok = copy / "tokenizer" / "tokenizer.model"
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] ^= 0x01
    tok.write_bytes(bytes(data))
    r = sf("data", "verify", copy)
    assert r.returncode == EXIT_INTEGRITY and "tokenizer.model: sha256 does not match" in r.stdout
    r = sf("data", "inspect", tmp_path)
    assert r.returncode == EXIT_USAGE and "holds no manifest.json" in r.stderr
