"""``shardforge data prepare``: raw text to verified webdataset shards, in one atomic step.

The stages of :mod:`data_pipeline.stages` run here as tasks of one machine (map tasks in ``data.num_workers``
processes): ingest, clean, filter and hash; deduplicate; split; train the tokenizer on a hash-selected sample of
the training split (or copy one); then tokenize in worker processes and pack each split into shards. ``--slurm``
runs the same stages as Slurm jobs, so both give the same documents, tokenizer and token counts. The manifest is
written last and the folder renamed into place, so an interrupted run never leaves something a later step could
take as complete.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from core.config import DataConfig, RunConfig
from core.errors import DataError
from core.files import publish_dir, sha256_file
from data_pipeline import stages
from data_pipeline.ingest import IngestStats, resolve_inputs
from data_pipeline.manifest import MANIFEST, TOKENIZER_FILE, read_manifest, write_manifest
from data_pipeline.pack import EncoderPool, SplitWriter, token_dtype
from data_pipeline.split import SPLIT_NAMES, MergedDigests
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


def make_tokenizer(cfg: RunConfig, work: Path, sample: Iterable[str]) -> Path:
    """``work/tokenizer/tokenizer.model``: trained on ``sample`` (the hash-selected training text), or copied."""
    out = work / TOKENIZER_FILE
    out.parent.mkdir(parents=True)
    if cfg.tokenizer.model_file:
        load_tokenizer(cfg.tokenizer.model_file)  # fails clearly on a bad file
        shutil.copyfile(cfg.tokenizer.model_file, out)
        return out
    train_tokenizer(sample, cfg.tokenizer, out, seed=cfg.data.seed)
    return out


def pack_split(cfg: RunConfig, out: Path, split: str, texts: Iterable[str], tok: EncoderPool, vocab_size: int,
               name_prefix: str = "shard", total: int | None = None) -> dict:  # fmt: skip
    """Tokenize ``texts`` and pack them into ``out/<split>/`` shards; the split's summary."""
    writer = SplitWriter(
        out / split,
        split,
        sample_tokens=cfg.data.seq_length + 1,
        dtype=token_dtype(vocab_size),
        max_shard_bytes=int(cfg.data.shard_size_mb * 1e6),
        name_prefix=name_prefix,
    )
    for ids in _progress(tok.encode(texts), f"tokenize+pack {split}", total=total):
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


def _run_maps(cfg: RunConfig, tmp: Path, groups: list, fractions: tuple) -> None:
    args = [(tmp, g, t, len(groups), fractions) for t, g in enumerate(groups)]
    workers = min(cfg.data.num_workers, len(groups))
    if workers <= 1:
        for a in args:
            stages.run_map(*a)
        return
    # workers with SIGTERM's default action (a forked copy of a Python handler that only sets a flag, such as a
    # rank's, would leave terminate() waiting on them forever), closed and joined when done
    with mp.get_context("fork").Pool(
        workers, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)
    ) as pool:
        pool.starmap(stages.run_map, args)
        pool.close()
        pool.join()


def _build(cfg: RunConfig, work: Path, fingerprint: str) -> dict:
    """The stages of :mod:`data_pipeline.stages` on this machine: map tasks in ``data.num_workers`` processes."""
    tmp = work / ".stages"
    tasks = 1 if cfg.data.max_documents is not None else cfg.data.num_workers
    groups = stages.plan_groups(cfg.data, held_out_configs(cfg.data), tasks)
    n = len(groups)
    _run_maps(cfg, tmp, groups, hash_split_fractions(cfg.data))
    for part in range(n):
        stages.run_dedup(tmp, cfg.data, part, n)
    rate = stages.sample_rate(cfg, tmp, n)
    for t in range(n):
        stages.run_filter(cfg, tmp, t, n, rate)
    stats, maps, merged = stages.merge_results(tmp, n)
    info = {s: {**merged["splits"][s], "digests": MergedDigests(stages.digest_files(tmp, s, n))} for s in SPLIT_NAMES}
    check_not_empty(stats, info)
    tok_file = make_tokenizer(cfg, work, stages.sample_texts(tmp, n))
    vocab = load_tokenizer(tok_file).get_piece_size()
    splits = {}
    with EncoderPool(tok_file, cfg.data.num_workers) as tok:
        for s in SPLIT_NAMES:
            texts = stages.split_texts(tmp, s, list(range(n)))
            splits[s] = pack_split(cfg, work, s, texts, tok, vocab, total=info[s]["documents"])
    report = stages.filter_report(cfg.data, maps, merged)
    manifest = write_manifest(cfg, work, fingerprint, info, splits, asdict(stats), report)
    shutil.rmtree(tmp)
    return manifest
