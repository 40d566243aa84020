"""``shardforge data prepare --slurm``: the pipeline of :mod:`data_pipeline.prepare` cut into Slurm jobs.

============  ===================  =============================================================================
stage         runs as              does
============  ===================  =============================================================================
``map``       array task i of N    ingest the i-th contiguous group of input files; clean, length and quality
                                   filters; MinHash signature of every surviving document
``dedup``     one task             exact and near deduplication over all tasks' documents in the global input
                                   order (the order one machine uses, so the same documents survive), split
                                   assignment, tokenizer training on the same sample as one machine
``pack``      array task i of N    tokenize and pack task i's surviving documents (its own byte range of the
                                   split files, nothing before it) into its own shards
``finalize``  one task             one manifest with counts and checksums; atomic publish into data.output_dir
============  ===================  =============================================================================

Signatures, the expensive part of near-deduplication, are computed in parallel; the LSH index that compares them
is built once over the whole corpus, so deduplication is global across tasks. Each stage writes its files under
the work folder ``.<output>.slurm-work/`` and its result file last, so a stage that died is visible as missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from core.config import RunConfig, load_config
from core.errors import DataError, ShardforgeError
from core.files import publish_dir, write_json_atomic
from data_pipeline.filters import FilterPipeline
from data_pipeline.ingest import IngestStats, iter_documents, resolve_inputs
from data_pipeline.manifest import TOKENIZER_FILE, write_manifest
from data_pipeline.pack import EncoderPool, SplitWriter, token_dtype
from data_pipeline.prepare import check_not_empty, dataset_fingerprint, make_tokenizer
from data_pipeline.split import SPLIT_NAMES, DigestSet, assign_split, content_digest
from data_pipeline.tokenizer import load_tokenizer

STAGES = ("map", "dedup", "pack", "finalize")


def work_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.data.output_dir).absolute()
    return out.parent / f".{out.name}.slurm-work"


def file_groups(files: list[Path], tasks: int) -> list[list[Path]]:
    """``tasks`` contiguous slices of the sorted input files (some empty when there are fewer files)."""
    bounds = np.linspace(0, len(files), tasks + 1).round().astype(int)
    return [files[bounds[i] : bounds[i + 1]] for i in range(tasks)]


def _task_file(work: Path, stage: str, task: int, suffix: str) -> Path:
    return work / stage / f"task-{task:05d}{suffix}"


def stage_map(cfg: RunConfig, work: Path, task: int, tasks: int) -> None:
    files = file_groups(resolve_inputs(cfg.data), tasks)[task]
    stats, filt = IngestStats(), FilterPipeline(cfg.data)
    (work / "map").mkdir(parents=True, exist_ok=True)
    sigs = []
    with open(_task_file(work, "map", task, ".jsonl"), "w", encoding="utf-8") as f:
        for doc in iter_documents(cfg.data, stats, files):
            text = filt.prefilter(doc)
            if text is not None:
                f.write(json.dumps({"text": text}) + "\n")
                sigs.append(filt.signature(text))
    if cfg.data.dedup_near:
        np.save(_task_file(work, "map", task, ".minhash.npy"), np.array(sigs))
    result = {"files": len(files), "ingest": asdict(stats), "filter_report": filt.report()}
    write_json_atomic(_task_file(work, "map", task, ".json"), result)
    print(f"map task {task}: {len(files)} files, {stats.documents} documents, {len(sigs)} after filters")


def _result(work: Path, stage: str, task: int) -> dict:
    path = _task_file(work, stage, task, ".json")
    if not path.is_file():
        raise DataError(f"{path} is missing: {stage} task {task} did not finish", fix=f"see the logs in {work}/logs")
    return json.loads(path.read_text())


def _merge_ingest(total: IngestStats, part: dict) -> None:
    for key in ("files", "documents", "bytes", "skipped_invalid_utf8", "skipped_missing_field"):
        setattr(total, key, getattr(total, key) + part[key])
    total.skipped_files += part["skipped_files"]


def stage_dedup(cfg: RunConfig, work: Path, tasks: int) -> None:
    stats, filt = IngestStats(), FilterPipeline(cfg.data)
    doc_dir = work / "dataset" / "documents"
    doc_dir.mkdir(parents=True, exist_ok=True)
    outs = {s: open(doc_dir / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLIT_NAMES}
    info = {s: {"documents": 0, "bytes": 0, "digests": DigestSet()} for s in SPLIT_NAMES}
    ranges = []
    try:
        for task in range(tasks):
            part = _result(work, "map", task)
            _merge_ingest(stats, part["ingest"])
            filt.absorb(part["filter_report"])
            start = {s: outs[s].tell() for s in SPLIT_NAMES}
            _dedup_task(cfg, work, task, filt, outs, info)
            ranges.append({s: [start[s], outs[s].tell()] for s in SPLIT_NAMES})  # byte ranges of task's documents
    finally:
        for f in outs.values():
            f.close()
    check_not_empty(stats, info)
    make_tokenizer(cfg, work / "dataset", info["train"]["bytes"])
    splits = {s: {"documents": info[s]["documents"], "bytes": info[s]["bytes"]} for s in SPLIT_NAMES}
    result = {"ranges": ranges, "ingest": asdict(stats), "filter_report": filt.report(), "splits": splits}
    write_json_atomic(work / "dedup.json", result)
    print("dedup: " + ", ".join(f"{s} {info[s]['documents']} documents" for s in SPLIT_NAMES))


def _dedup_task(cfg: RunConfig, work: Path, task: int, filt: FilterPipeline, outs: dict, info: dict) -> None:
    sigs = np.load(_task_file(work, "map", task, ".minhash.npy")) if cfg.data.dedup_near else None
    with open(_task_file(work, "map", task, ".jsonl"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            text = json.loads(line)["text"]
            if not filt.deduplicate(text, None if sigs is None else sigs[i]):
                continue
            filt.docs_out += 1
            filt.bytes_out += len(text.encode("utf-8"))
            digest = content_digest(text)
            split = assign_split(digest, cfg.data.split)
            outs[split].write(json.dumps({"text": text, "digest": digest.hex()}) + "\n")
            info[split]["documents"] += 1
            info[split]["bytes"] += len(text.encode("utf-8"))
            info[split]["digests"].add(digest)


def _lines(path: Path, start: int, end: int):
    """The documents written between byte offsets ``start`` and ``end``: a pack task reads only its own."""
    with open(path, "rb") as f:
        f.seek(start)
        while f.tell() < end:
            yield json.loads(f.readline())["text"]


def stage_pack(cfg: RunConfig, work: Path, task: int) -> None:
    dedup = json.loads((work / "dedup.json").read_text())
    tok_file = work / "dataset" / TOKENIZER_FILE
    vocab = load_tokenizer(tok_file).get_piece_size()
    summaries = {}
    with EncoderPool(tok_file, cfg.data.num_workers) as tok:
        for s in SPLIT_NAMES:
            start, end = dedup["ranges"][task][s]
            writer = SplitWriter(
                work / "dataset" / s,
                s,
                sample_tokens=cfg.data.seq_length + 1,
                dtype=token_dtype(vocab),
                max_shard_bytes=int(cfg.data.shard_size_mb * 1e6),
                name_prefix=f"t{task:05d}",
            )
            for ids in tok.encode(_lines(work / "dataset" / "documents" / f"{s}.jsonl", start, end)):
                writer.add_document(ids)
            writer.close()
            summaries[s] = writer.summary()
    (work / "pack").mkdir(exist_ok=True)
    write_json_atomic(_task_file(work, "pack", task, ".json"), summaries)
    print(f"pack task {task}: " + ", ".join(f"{s} {summaries[s]['samples']} samples" for s in SPLIT_NAMES))


def _merged_splits(work: Path, tasks: int) -> dict:
    parts = [_result(work, "pack", t) for t in range(tasks)]
    splits = {}
    for s in SPLIT_NAMES:
        keys = ("documents", "samples", "tokens", "dropped_tail_tokens", "document_tokens")
        splits[s] = {k: sum(p[s][k] for p in parts) for k in keys}
        splits[s]["shards"] = [shard for p in parts for shard in p[s]["shards"]]
    return splits


def stage_finalize(cfg: RunConfig, work: Path, tasks: int) -> None:
    dedup = json.loads((work / "dedup.json").read_text())
    dataset = work / "dataset"
    info = {}
    for s in SPLIT_NAMES:
        digests = DigestSet()
        with open(dataset / "documents" / f"{s}.jsonl", encoding="utf-8") as f:
            for line in f:
                digests.add(bytes.fromhex(json.loads(line)["digest"]))
        info[s] = {"digests": digests, "bytes": dedup["splits"][s]["bytes"]}
    splits = _merged_splits(work, tasks)
    fingerprint = dataset_fingerprint(cfg)
    manifest = write_manifest(cfg, dataset, fingerprint, info, splits, dedup["ingest"], dedup["filter_report"])
    manifest_note = f"{sum(len(v['shards']) for v in manifest['splits'].values())} shards"
    publish_dir(dataset, Path(cfg.data.output_dir).absolute())
    for stage in ("map", "pack"):
        shutil.rmtree(work / stage, ignore_errors=True)
    (work / "dedup.json").unlink(missing_ok=True)
    print(f"finalize: published {cfg.data.output_dir} ({manifest_note}); logs stay in {work}/logs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="data_pipeline.slurm_stages", description="one stage of data prepare --slurm")
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("-c", "--config", required=True, help="the frozen config written at submission")
    ap.add_argument("--work", required=True)
    ap.add_argument("--task", type=int, default=0)
    ap.add_argument("--tasks", type=int, required=True)
    args = ap.parse_args(argv)
    try:
        cfg, work = load_config(args.config), Path(args.work)
        if args.stage == "map":
            stage_map(cfg, work, args.task, args.tasks)
        elif args.stage == "dedup":
            stage_dedup(cfg, work, args.tasks)
        elif args.stage == "pack":
            stage_pack(cfg, work, args.task)
        else:
            stage_finalize(cfg, work, args.tasks)
    except ShardforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
