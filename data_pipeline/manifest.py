"""The dataset manifest (``manifest.json``): what a prepared dataset holds, and how to check it.

It lists every shard of every split with sample and token counts, size and sha256, the tokenizer's hash and
vocabulary size, the sequence length, the config that made it and the filter report. ``verify`` re-hashes
every file; ``format_table`` is what ``shardforge data inspect`` prints.
"""

from __future__ import annotations

import json
from pathlib import Path

from core.config import RunConfig
from core.errors import DataError, IntegrityError
from core.files import sha256_file, write_json_atomic
from data_pipeline.pack import token_dtype
from data_pipeline.split import SPLIT_NAMES
from data_pipeline.tarshard import index_path
from data_pipeline.tokenizer import load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "shardforge-shards/1"
SPLITS = ("train", "validation", "test")
TOKENIZER_FILE = "tokenizer/tokenizer.model"


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
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    entries = [(s["path"], s["bytes"], s["sha256"]) for s in shards]
    entries += [(index_path(s["path"]), None, s["index_sha256"]) for s in shards if "index_sha256" in s]
    tok = manifest["tokenizer"]
    entries.append((tok["file"], None, tok["sha256"]))
    for rel, size, digest in entries:
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif size is not None and path.stat().st_size != size:
            problems.append(f"{path}: size {path.stat().st_size} != manifest {size} (truncated or replaced)")
        elif sha256_file(path) != digest:
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


def write_manifest(
    cfg: RunConfig,
    work: Path,
    fingerprint: str,
    info: dict,
    splits: dict,
    ingest: dict,
    filter_report: dict,
    dtype: str | None = None,
    kind: str = "text",
) -> dict:
    """Check the packed splits, keep only the per-split document digests, and write ``work/manifest.json``."""
    tok_file = work / TOKENIZER_FILE
    sp = load_tokenizer(tok_file)
    for s in SPLIT_NAMES:
        splits[s]["documents_digest"] = info[s]["digests"].hexdigest()
        splits[s]["text_bytes"] = info[s]["bytes"]
    if splits["train"]["samples"] == 0:
        raise DataError(
            f"the train split holds {splits['train']['dropped_tail_tokens']} tokens, fewer than one sample of "
            f"data.seq_length+1={cfg.data.seq_length + 1}",
            fix="give more text or lower data.seq_length",
        )
    (work / "documents").mkdir(exist_ok=True)
    for s in SPLIT_NAMES:  # keep only the per-split lists of document digests
        (work / "documents" / f"{s}.jsonl").unlink(missing_ok=True)
        info[s]["digests"].write(work / "documents" / f"{s}.sha256")
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "seq_length": cfg.data.seq_length,
        "sample_tokens": cfg.data.seq_length + 1,
        "dtype": dtype or token_dtype(sp.get_piece_size()).name,
        "kind": kind,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": sha256_file(tok_file),
            "vocab_size": sp.get_piece_size(),
            "model_type": cfg.tokenizer.model_type if not cfg.tokenizer.model_file else "reused",
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "pad_id": sp.pad_id(),
        },
        "splits": splits,
        "ingest": {k: v for k, v in ingest.items() if k != "skipped_files"},
        "skipped_files": ingest["skipped_files"][:100],
        "filter_report": filter_report,
        "config": {"data": cfg.data.model_dump(mode="json"), "tokenizer": cfg.tokenizer.model_dump(mode="json")},
    }
    write_json_atomic(work / MANIFEST, manifest)
    return manifest
