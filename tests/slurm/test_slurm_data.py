"""`data prepare --slurm` on the real 2-node Slurm equals a single-machine `data prepare`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import yaml
from conftest import REPO, stdlib_files


def _corpus(root):
    """40 real files, plus exact and near duplicates whose originals fall in other array tasks' file groups, and 12
    more documents in a parquet file (row groups of 4) and a JSONL file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    files, more = stdlib_files(40), [f.read_text() for f in stdlib_files(52)[40:]]
    pq.write_table(pa.table({"text": more[:6]}), root / "c_docs.parquet", row_group_size=4)
    (root / "d_docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in more[6:]))
    for f in files:
        shutil.copyfile(f, root / f"b_{f.name}")
    for f in files[:3]:  # exact copies, sorted first: task 0 keeps them, tasks 1-3 drop the originals
        shutil.copyfile(f, root / f"a_{f.name}")
    near = files[-1].read_text()
    (root / "z_near.py").write_text(near.replace("def ", "def  ", 1) + "\n# one extra line\n")
    return root


def test_slurm_prepare_matches_the_local_one(slurm_cluster, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    config = tmp_path / "data.yaml"
    raw = {
        "run_dir": str(tmp_path / "run"),
        "data": {"inputs": [str(corpus)], "seq_length": 64, "split": [0.8, 0.1, 0.1], "shard_size_mb": 0.25,
                 "num_workers": 1},
        "tokenizer": {"vocab_size": 512, "sample_mb": 1.0},
        "slurm": {"cpus_per_task": 1, "array_tasks": 4, "time": "10"},
    }  # fmt: skip
    config.write_text(yaml.safe_dump(raw))
    base = [sys.executable, "-m", "launcher.cli", "data", "prepare", "-c", str(config)]
    env = {**os.environ}
    local = subprocess.run([*base, f"data.output_dir={tmp_path}/local"], cwd=REPO, env=env, capture_output=True,
                           text=True)  # fmt: skip
    assert local.returncode == 0, local.stderr
    slurm = subprocess.run([*base, f"data.output_dir={tmp_path}/slurm", "--slurm", "--wait"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert slurm.returncode == 0, slurm.stdout + slurm.stderr
    assert slurm.stdout.count("submitted") == 6
    a = json.loads((tmp_path / "local" / "manifest.json").read_text())
    b = json.loads((tmp_path / "slurm" / "manifest.json").read_text())
    stages = a["filter_report"]["stages"]
    assert a["ingest"]["files"] == 46 and a["ingest"]["documents"] == 56  # 44 .py, 6 parquet rows, 6 JSONL lines
    assert stages["exact_dedup"]["docs_dropped"] == 3 and stages["near_dedup"]["docs_dropped"] == 1
    assert b["filter_report"] == a["filter_report"] and b["ingest"] == a["ingest"]
    assert b["tokenizer"] == a["tokenizer"]  # same sample of the same documents: the same SentencePiece model
    for split in ("train", "validation", "test"):
        for key in ("documents", "documents_digest", "text_bytes", "document_tokens"):
            assert b["splits"][split][key] == a["splits"][split][key], (split, key)
        shards = b["splits"][split]["shards"]
        assert {s["path"].split("/")[1][:6] for s in shards} <= {f"t{t:05d}" for t in range(4)}
    verify = subprocess.run([sys.executable, "-m", "launcher.cli", "data", "verify", str(tmp_path / "slurm")],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert verify.returncode == 0, verify.stdout
    assert not (tmp_path / ".slurm.slurm-work" / "map").exists()  # stage files removed, logs kept
    assert len(list((tmp_path / ".slurm.slurm-work" / "logs").glob("map-*.out"))) == 4
