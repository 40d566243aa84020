"""The stages of ``data prepare``, each a task over a part of the corpus; one machine and Slurm run the same ones.

============  ===============  ===================================================================================
stage         tasks            does
============  ===============  ===================================================================================
``map``       one per group    ingest a contiguous group of input files; clean, length and quality filters;
                               content digest and MinHash bands of each document (:mod:`data_pipeline.dedup`)
``dedup``     one per part     exact and near duplicates among one partition of every map task's records
``filter``    one per group    drop the group's duplicates, assign splits, write the group's documents per split,
                               its sorted content digests and its share of the tokenizer sample
``tokenizer`` one              train SentencePiece on the sample (streamed from the groups' files, all cores)
``pack``      one per group    (Slurm) tokenize and pack the group's documents into its own shards
============  ===============  ===================================================================================

No task reads more than its group's documents, one partition of the records, or its group's removals; the
manifest's digests are merged from the groups' sorted files as a stream. Files live under ``tmp`` (``map/``,
``dedup/``, ``docs/``), each task's result JSON written last. The sample rule: a document of the train split is in
the tokenizer sample when a hash of its content is below ``tokenizer.sample_mb`` / (train-split bytes before
deduplication), so the sample does not depend on how the corpus is cut into tasks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.config import DataConfig, RunConfig
from core.errors import DataError
from core.files import write_json_atomic
from data_pipeline.dedup import RecordWriter, find_removals, read_partition, removals_for_task
from data_pipeline.filters import FilterPipeline, dedup_stage
from data_pipeline.ingest import IngestStats, iter_documents, resolve_inputs
from data_pipeline.split import SPLIT_NAMES, assign_split, content_digest, unit_interval


@dataclass
class Group:
    """The input of one map task: files read with ``data``'s settings; ``split`` fixed for held-out inputs."""

    files: list[Path]
    data: DataConfig
    split: str | None = None


def file_groups(files: list[Path], tasks: int) -> list[list[Path]]:
    """``tasks`` contiguous slices of the sorted input files (some empty when there are fewer files)."""
    bounds = np.linspace(0, len(files), tasks + 1).round().astype(int)
    return [files[bounds[i] : bounds[i + 1]] for i in range(tasks)]


def plan_groups(data: DataConfig, held_out: dict[str, DataConfig], tasks: int) -> list[Group]:
    """Held-out inputs first (one group per split, so their documents come first), then the training files."""
    groups = [Group(resolve_inputs(d), d, split) for split, d in held_out.items()]
    return groups + [Group(f, data) for f in file_groups(resolve_inputs(data), tasks)]


def task_file(tmp: Path, stage: str, task: int, suffix: str) -> Path:
    return tmp / stage / f"task-{task:05d}{suffix}"


def result(tmp: Path, stage: str, task: int) -> dict:
    path = task_file(tmp, stage, task, ".json")
    if not path.is_file():
        raise DataError(f"{path} is missing: {stage} task {task} did not finish", fix="see the task's log")
    return json.loads(path.read_text())


def rate_line(stage: str, task: int, docs: int, nbytes: int, t0: float) -> str:
    s = max(time.perf_counter() - t0, 1e-9)
    rates = f"{docs / s:.0f} docs/s, {nbytes / s / 1e6:.1f} MB/s"
    return f"{stage} task {task}: {docs} documents, {nbytes / 1e6:.1f} MB in {s:.1f} s ({rates})"


def run_map(tmp: Path, group: Group, task: int, partitions: int, fractions: tuple) -> dict:
    """Map task: filtered documents (text, digest, split) and their dedup records; returns the result JSON."""
    t0 = time.perf_counter()
    stats, filt = IngestStats(), FilterPipeline(group.data)
    records = RecordWriter(group.data, task, partitions)
    split_bytes = dict.fromkeys(SPLIT_NAMES, 0)
    (tmp / "map").mkdir(parents=True, exist_ok=True)
    with open(task_file(tmp, "map", task, ".jsonl"), "w", encoding="utf-8") as f:
        for doc in iter_documents(group.data, stats, group.files):
            text = filt.prefilter(doc)
            if text is None:
                continue
            digest = content_digest(text)
            split = group.split or assign_split(digest, fractions)
            split_bytes[split] += len(text.encode("utf-8"))
            records.add(digest, filt.signature(text), held=group.split is not None)
            f.write(json.dumps({"text": text, "digest": digest.hex(), "split": split}) + "\n")
    counts = records.save(task_file(tmp, "map", task, ".records.npy"))
    res = {"files": len(group.files), "held_out": group.split is not None, "ingest": asdict(stats),
           "filter_report": filt.report(), "counts": counts, "split_bytes": split_bytes}  # fmt: skip
    write_json_atomic(task_file(tmp, "map", task, ".json"), res)
    print(rate_line("map", task, stats.documents, stats.bytes, t0), f"({len(group.files)} files)", flush=True)
    return res


def run_dedup(tmp: Path, data: DataConfig, part: int, tasks: int) -> dict:
    """Dedup task: the removals among partition ``part`` of every map task's records."""
    t0 = time.perf_counter()
    recs = [read_partition(task_file(tmp, "map", t, ".records.npy"), result(tmp, "map", t)["counts"], part)
            for t in range(tasks)]  # fmt: skip
    rem = find_removals(np.concatenate(recs), data.dedup_exact, data.dedup_near)
    (tmp / "dedup").mkdir(parents=True, exist_ok=True)
    np.save(task_file(tmp, "dedup", part, ".npy"), rem)
    res = {"records": sum(len(r) for r in recs), "removed": len(rem)}
    write_json_atomic(task_file(tmp, "dedup", part, ".json"), res)
    s = max(time.perf_counter() - t0, 1e-9)
    print(f"dedup task {part}: {res['records']} records, {len(rem)} documents to drop in {s:.1f} s "
          f"({res['records'] / s:.0f} records/s)", flush=True)  # fmt: skip
    return res


def sample_rate(cfg: RunConfig, tmp: Path, tasks: int) -> float:
    train = sum(result(tmp, "map", t)["split_bytes"]["train"] for t in range(tasks))
    return cfg.tokenizer.sample_mb * 1e6 / max(train, 1)


def run_filter(cfg: RunConfig, tmp: Path, task: int, tasks: int, rate: float) -> dict:
    """Filter task: drop this group's duplicates; documents, sorted digests and tokenizer sample per split."""
    t0 = time.perf_counter()
    removed = removals_for_task(sorted((tmp / "dedup").glob("task-*.npy")), task)
    salt = f"tokenizer-sample-{cfg.data.seed}".encode()
    docs = tmp / "docs"
    docs.mkdir(parents=True, exist_ok=True)
    outs = {s: open(task_file(tmp, "docs", task, f".{s}.jsonl"), "w", encoding="utf-8") for s in SPLIT_NAMES}
    sample = open(task_file(tmp, "docs", task, ".sample.jsonl"), "w", encoding="utf-8")
    digests: dict[str, list[bytes]] = {s: [] for s in SPLIT_NAMES}
    splits = {s: {"documents": 0, "bytes": 0} for s in SPLIT_NAMES}
    dropped = {"exact_dedup": [0, 0], "near_dedup": [0, 0]}
    n = 0
    try:
        with open(task_file(tmp, "map", task, ".jsonl"), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                rec = json.loads(line)
                nbytes = len(rec["text"].encode("utf-8"))
                if (n - 1) in removed:
                    stage = dedup_stage(removed[n - 1])
                    if stage:
                        dropped[stage][0] += 1
                        dropped[stage][1] += nbytes
                    continue
                s, digest = rec["split"], bytes.fromhex(rec["digest"])
                out = json.dumps({"text": rec["text"]}) + "\n"
                outs[s].write(out)
                digests[s].append(digest)
                splits[s]["documents"] += 1
                splits[s]["bytes"] += nbytes
                if s == "train" and unit_interval(digest, salt) < rate:
                    sample.write(out)
    finally:
        for f in [*outs.values(), sample]:
            f.close()
    for s in SPLIT_NAMES:
        task_file(tmp, "docs", task, f".{s}.digests").write_bytes(b"".join(sorted(digests[s])))
    res = {"splits": splits, "documents_in": n, "dropped": dropped}
    write_json_atomic(task_file(tmp, "docs", task, ".json"), res)
    kept = sum(v["documents"] for v in splits.values())
    print(rate_line("filter", task, n, sum(v["bytes"] for v in splits.values()), t0),
          f"kept {kept}, exact copies {dropped['exact_dedup'][0]}, near copies {dropped['near_dedup'][0]}",
          flush=True)  # fmt: skip
    return res


def merge_results(tmp: Path, tasks: int) -> tuple[IngestStats, list[dict], dict]:
    """Ingest counts (held-out inputs not counted, as their own corpus), filter report and split sizes."""
    maps = [result(tmp, "map", t) for t in range(tasks)]
    stats = IngestStats()
    for m in maps:
        if not m["held_out"]:
            for key in ("files", "documents", "bytes", "skipped_invalid_utf8", "skipped_missing_field"):
                setattr(stats, key, getattr(stats, key) + m["ingest"][key])
            stats.skipped_files += m["ingest"]["skipped_files"]
    splits = {s: {"documents": 0, "bytes": 0} for s in SPLIT_NAMES}
    dropped = {"exact_dedup": [0, 0], "near_dedup": [0, 0]}
    docs_in = 0
    for t in range(tasks):
        part = result(tmp, "docs", t)
        docs_in += part["documents_in"]
        for s in SPLIT_NAMES:
            for k in ("documents", "bytes"):
                splits[s][k] += part["splits"][s][k]
        for stage, (d, b) in part["dropped"].items():
            dropped[stage][0] += d
            dropped[stage][1] += b
    return stats, maps, {"splits": splits, "dropped": dropped, "docs_in": docs_in}


def filter_report(data: DataConfig, maps: list[dict], merged: dict) -> dict:
    filt = FilterPipeline(data)
    for m in maps:
        filt.absorb(m["filter_report"])
    filt.count_dedup(merged["docs_in"], merged["dropped"])
    filt.docs_out = sum(v["documents"] for v in merged["splits"].values())
    filt.bytes_out = sum(v["bytes"] for v in merged["splits"].values())
    return filt.report()


def sample_texts(tmp: Path, tasks: int):
    """The tokenizer sample, streamed from every group's sample file in input order."""
    for t in range(tasks):
        with open(task_file(tmp, "docs", t, ".sample.jsonl"), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def split_texts(tmp: Path, split: str, tasks: list[int]):
    for t in tasks:
        with open(task_file(tmp, "docs", t, f".{split}.jsonl"), encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def digest_files(tmp: Path, split: str, tasks: int) -> list[Path]:
    return [task_file(tmp, "docs", t, f".{split}.digests") for t in range(tasks)]
