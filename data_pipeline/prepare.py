"""``shardforge data prepare``: raw text to verified webdataset shards, in one atomic step.

Pass 1 ingests, cleans, filters, deduplicates and splits documents into per-split JSONL files in a temporary
folder. The tokenizer is then trained on a hash-selected sample of the training split (or copied). Pass 2
tokenizes in worker processes and packs each split into shards. The manifest is written last and the folder
renamed into place, so an interrupted run never leaves something a later step could take as complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from core.config import DataConfig, RunConfig
from core.errors import DataError
from core.files import publish_dir, sha256_file
from data_pipeline.filters import FilterPipeline
from data_pipeline.ingest import IngestStats, iter_documents, resolve_inputs
from data_pipeline.manifest import MANIFEST, TOKENIZER_FILE, read_manifest, write_manifest
from data_pipeline.pack import EncoderPool, SplitWriter, token_dtype
from data_pipeline.split import SPLIT_NAMES, DigestSet, assign_split, content_digest, unit_interval
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class PrepareResult:
    output_dir: Path
    manifest: dict
    reused: bool


def _progress(iterable, desc: str, total: int | None = None, unit: str = "doc"):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None, leave=False, mininterval=1.0)


def dataset_fingerprint(cfg: RunConfig) -> str:
    """Hash of everything that decides the dataset's content: data and tokenizer settings and the inputs."""
    data = cfg.data.model_dump(mode="json", exclude={"output_dir", "num_workers"})
    inputs = [*resolve_inputs(cfg.data), *(p for d in held_out_configs(cfg.data).values() for p in resolve_inputs(d))]
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in inputs]
    tok = cfg.tokenizer.model_dump(mode="json")
    if cfg.tokenizer.model_file:
        tok["model_file"] = sha256_file(cfg.tokenizer.model_file)
    blob = json.dumps({"data": data, "tokenizer": tok, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_output_dir(out: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """Return the existing manifest if ``out`` already holds this very dataset; refuse to clobber another."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if (out / MANIFEST).is_file():
        existing = read_manifest(out)
        if existing.get("fingerprint") == fingerprint:
            return existing
    if overwrite:
        return None
    raise DataError(
        f"data.output_dir '{out}' already holds a different dataset (or other files)",
        fix="choose another data.output_dir, or pass --overwrite to replace it",
    )


def held_out_configs(data: DataConfig) -> dict[str, DataConfig]:
    """The splits that come from their own files (``data.validation_inputs``/``test_inputs``), each as a data
    config reading those files (all of them: ``max_documents`` limits the training inputs only)."""
    own = {"validation": data.validation_inputs, "test": data.test_inputs}
    return {s: data.model_copy(update={"inputs": list(p), "max_documents": None}) for s, p in own.items() if p}


def hash_split_fractions(data: DataConfig) -> tuple[float, float, float]:
    """``data.split`` with the share of every split that has its own inputs moved to train."""
    own = held_out_configs(data)
    train, val, test = data.split
    return (train + sum(f for s, f in (("validation", val), ("test", test)) if s in own),
            0.0 if "validation" in own else val, 0.0 if "test" in own else test)  # fmt: skip


def _split_documents(cfg: RunConfig, work: Path, stats: IngestStats, filt: FilterPipeline) -> dict:
    """Pass 1: write each split's cleaned documents to ``work/documents/<split>.jsonl``.

    Splits with their own inputs are read first, through the same filters (so exact and near duplicates of a
    held-out document are dropped from training by deduplication), and their content digests are kept out of
    training even with deduplication off."""
    doc_dir = work / "documents"
    doc_dir.mkdir(parents=True)
    files = {s: open(doc_dir / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLIT_NAMES}
    info = {s: {"documents": 0, "bytes": 0, "digests": DigestSet()} for s in SPLIT_NAMES}

    def put(split: str, text: str, digest: bytes) -> None:
        files[split].write(json.dumps({"text": text, "digest": digest.hex()}) + "\n")
        info[split]["documents"] += 1
        info[split]["bytes"] += len(text.encode("utf-8"))
        info[split]["digests"].add(digest)

    held: set[bytes] = set()
    fractions = hash_split_fractions(cfg.data)
    try:
        for split, data in held_out_configs(cfg.data).items():
            for doc in _progress(filt.run(iter_documents(data, IngestStats())), f"{split} inputs"):
                digest = content_digest(doc.text)
                held.add(digest)
                put(split, doc.text, digest)
        for doc in _progress(filt.run(iter_documents(cfg.data, stats)), "clean+filter+dedup"):
            digest = content_digest(doc.text)
            if digest not in held:
                put(assign_split(digest, fractions), doc.text, digest)
    finally:
        for f in files.values():
            f.close()
    check_not_empty(stats, info)
    return info


def check_not_empty(stats: IngestStats, info: dict) -> None:
    if stats.documents == 0:
        raise DataError(
            "the corpus is empty: data.inputs yielded no documents"
            + (f" ({stats.skipped_invalid_utf8} files skipped as invalid UTF-8)" if stats.skipped_invalid_utf8 else ""),
            fix="point data.inputs at files with text",
        )
    if info["train"]["documents"] == 0:
        raise DataError(
            f"all {stats.documents} documents were filtered out or none fell in the train split",
            fix="loosen data.min_chars / quality thresholds or give more documents",
        )


def _read_split(work: Path, split: str) -> Iterator[dict]:
    with open(work / "documents" / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def make_tokenizer(cfg: RunConfig, work: Path, train_bytes: int) -> Path:
    out = work / TOKENIZER_FILE
    out.parent.mkdir(parents=True)
    if cfg.tokenizer.model_file:
        load_tokenizer(cfg.tokenizer.model_file)  # fails clearly on a bad file
        shutil.copyfile(cfg.tokenizer.model_file, out)
        return out
    rate = cfg.tokenizer.sample_mb * 1e6 / max(train_bytes, 1)
    salt = f"tokenizer-sample-{cfg.data.seed}".encode()
    sample = (
        rec["text"] for rec in _read_split(work, "train") if unit_interval(bytes.fromhex(rec["digest"]), salt) < rate
    )
    train_tokenizer(sample, cfg.tokenizer, out, seed=cfg.data.seed)
    return out


def _pack_split(cfg: RunConfig, work: Path, split: str, tok: EncoderPool, vocab_size: int, n_docs: int) -> dict:
    writer = SplitWriter(
        work / split,
        split,
        sample_tokens=cfg.data.seq_length + 1,
        dtype=token_dtype(vocab_size),
        max_shard_bytes=int(cfg.data.shard_size_mb * 1e6),
    )
    texts = (rec["text"] for rec in _read_split(work, split))
    for ids in _progress(tok.encode(texts), f"tokenize+pack {split}", total=n_docs):
        writer.add_document(ids)
    writer.close()
    return writer.summary()


def prepare_dataset(cfg: RunConfig, overwrite: bool = False) -> PrepareResult:
    """Run the whole pipeline for ``cfg`` and return the manifest; reuse an identical finished dataset."""
    build = _build
    if cfg.data.format == "sft":
        from data_pipeline.sft import build_sft as build

        if held_out_configs(cfg.data):
            raise DataError("data.validation_inputs/test_inputs are for data.format=text",
                            fix="give fine-tuning data one file set and let data.split hold out by hash")  # fmt: skip
    out = Path(cfg.data.output_dir)
    fingerprint = dataset_fingerprint(cfg)
    existing = check_output_dir(out, fingerprint, overwrite)
    if existing is not None:
        return PrepareResult(out, existing, reused=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        manifest = build(cfg, work, fingerprint)
        publish_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PrepareResult(out, manifest, reused=False)


def _build(cfg: RunConfig, work: Path, fingerprint: str) -> dict:
    stats = IngestStats()
    filt = FilterPipeline(cfg.data)
    info = _split_documents(cfg, work, stats, filt)
    tok_file = make_tokenizer(cfg, work, info["train"]["bytes"])
    vocab = load_tokenizer(tok_file).get_piece_size()
    splits = {}
    with EncoderPool(tok_file, cfg.data.num_workers) as tok:
        for s in SPLIT_NAMES:
            splits[s] = _pack_split(cfg, work, s, tok, vocab, info[s]["documents"])
    return write_manifest(cfg, work, fingerprint, info, splits, asdict(stats), filt.report())
