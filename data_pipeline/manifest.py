"""The dataset manifest (``manifest.json``): what a prepared dataset holds, and how to check it.

It lists every shard of every split with sample and token counts, size and sha256, the tokenizer's hash and
vocabulary size, the sequence length, the config that made it and the filter report. ``verify`` re-hashes
every file; ``format_table`` is what ``shardforge data inspect`` prints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_pipeline.tokenizer import file_sha256
from launcher.errors import DataError, IntegrityError

MANIFEST = "manifest.json"
FORMAT = "shardforge-shards/1"
SPLITS = ("train", "validation", "test")


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to ``path`` through a temporary file, fsync, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to ``path`` through a temporary file, fsync, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(dataset_dir: str | Path) -> dict:
    """Load and sanity-check ``DIR/manifest.json``, naming the file in every error."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"'{dataset_dir}' holds no {MANIFEST}: it is not a prepared dataset (or preparation did not finish)",
            fix="run `shardforge data prepare -c CONFIG` first",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({e})", fix="re-run `shardforge data prepare`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path} is not a {FORMAT} manifest", fix="re-run `shardforge data prepare`")
    return manifest


def verify_dataset(dataset_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Re-hash every shard and the tokenizer; return one line per problem (empty when all match)."""
    root = Path(dataset_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    problems = []
    entries = [(s["path"], s["bytes"], s["sha256"]) for split in manifest["splits"].values() for s in split["shards"]]
    tok = manifest["tokenizer"]
    entries.append((tok["file"], None, tok["sha256"]))
    for rel, size, digest in entries:
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{path}: size {path.stat().st_size} != manifest {size} (truncated or replaced)")
        elif file_sha256(path) != digest:
            problems.append(f"{path}: sha256 does not match the manifest (corrupt)")
    return problems


def format_table(manifest: dict) -> str:
    """A human summary: one row per split, then the tokenizer and the filter report."""
    rows = [f"{'split':<11}{'docs':>9}{'shards':>8}{'samples':>10}{'tokens':>13}{'MB':>9}"]
    for name, split in manifest["splits"].items():
        mb = sum(s["bytes"] for s in split["shards"]) / 1e6
        rows.append(
            f"{name:<11}{split['documents']:>9}{len(split['shards']):>8}{split['samples']:>10}"
            f"{split['tokens']:>13}{mb:>9.2f}"
        )
    tok = manifest["tokenizer"]
    rows.append(
        f"seq_length {manifest['seq_length']}  tokenizer {tok['model_type']} vocab {tok['vocab_size']} "
        f"sha256 {tok['sha256'][:12]}"
    )
    ing = manifest["ingest"]
    rows.append(
        f"ingest: {ing['files']} files, {ing['documents']} documents, {ing['bytes'] / 1e6:.2f} MB; skipped "
        f"{ing['skipped_invalid_utf8']} invalid UTF-8, {ing['skipped_missing_field']} without text field"
    )
    for stage, c in manifest["filter_report"]["stages"].items():
        rows.append(
            f"  {stage:<12} in {c['docs_in']:>7}  dropped {c['docs_dropped']:>6} docs "
            f"{c['bytes_dropped'] / 1e6:>8.2f} MB"
        )
    return "\n".join(rows)
