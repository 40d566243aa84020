"""The `shardforge` command line as a user meets it: help, one-line errors, exit codes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import yaml
from conftest import REPO

from core.errors import EXIT_INTEGRITY, EXIT_USAGE


def sf(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


COMMANDS = {  # the README's command table, written out here
    "config": ["show"],
    "data": ["prepare", "inspect", "verify"],
    "train": [],
    "finetune": [],
    "continue": [],
    "checkpoint": ["inspect", "verify", "consolidate"],
    "plan": [],
    "slurm": ["script", "submit", "status"],
    "eval": [],
    "harness": [],
    "generate": [],
    "export": ["hf"],
    "quantize": [],
    "prune": [],
    "tensorboard": [],
}


def _listed(help_text: str) -> list[str]:
    """The sub-command names argparse lists under 'positional arguments' (one per line, indented 4 spaces)."""
    body = help_text.split("positional arguments:")[1].split("options:")[0]
    return [line.split()[0] for line in body.splitlines() if line.startswith("    ") and not line.startswith("     ")]


def test_help_lists_every_command_and_each_answers_help():
    assert _listed(sf("--help").stdout) == list(COMMANDS)
    for cmd, subs in COMMANDS.items():
        r = sf(cmd, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: shardforge {cmd}"), cmd
        if subs:
            assert _listed(r.stdout) == subs, cmd


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
