"""``shardforge data prepare --slurm``: the stages of :mod:`data_pipeline.stages` as Slurm jobs.

============  ===================  =============================================================================
stage         runs as              does
============  ===================  =============================================================================
``map``       array task i of N    ingest the i-th contiguous group of input files; clean, length and quality
                                   filters; content digest and MinHash band records, sorted into N partitions
``dedup``     array task k of N    exact and near duplicates in partition k of every map task's records
``filter``    array task i of N    drop group i's duplicates, assign splits, write its documents per split, its
                                   sorted digests and its share of the tokenizer sample
``tokenizer`` one task             train SentencePiece on the sample, with all the task's cores
``pack``      array task i of N    tokenize and pack group i's documents into its own shards
``finalize``  one task             one manifest (digests merged as a stream), checksums; atomic publish into
                                   data.output_dir
============  ===================  =============================================================================

No task holds the corpus: a map or filter task holds its group, a dedup task 1/N of the records. Each stage writes
its files under the work folder ``.<output>.slurm-work/`` and its result file last, so a stage that died is
visible as missing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

from core.config import RunConfig, load_config
from core.errors import ShardforgeError
from core.files import publish_dir, write_json_atomic
from data_pipeline import stages
from data_pipeline.manifest import TOKENIZER_FILE, write_manifest
from data_pipeline.pack import EncoderPool
from data_pipeline.prepare import check_not_empty, dataset_fingerprint, hash_split_fractions, make_tokenizer, pack_split
from data_pipeline.split import SPLIT_NAMES, MergedDigests
from data_pipeline.tokenizer import load_tokenizer

STAGES = ("map", "dedup", "filter", "tokenizer", "pack", "finalize")


def work_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.data.output_dir).absolute()
    return out.parent / f".{out.name}.slurm-work"


def stage_map(cfg: RunConfig, work: Path, task: int, tasks: int) -> None:
    group = stages.plan_groups(cfg.data, {}, tasks)[task]
    stages.run_map(work, group, task, tasks, hash_split_fractions(cfg.data))


def stage_tokenizer(cfg: RunConfig, work: Path, tasks: int) -> None:
    stats, _, merged = stages.merge_results(work, tasks)
    check_not_empty(stats, merged["splits"])
    make_tokenizer(cfg, work / "dataset", stages.sample_texts(work, tasks))
    print(f"tokenizer: trained on the sample of {tasks} tasks", flush=True)


def stage_pack(cfg: RunConfig, work: Path, task: int) -> None:
    tok_file = work / "dataset" / TOKENIZER_FILE
    vocab = load_tokenizer(tok_file).get_piece_size()
    summaries = {}
    with EncoderPool(tok_file, cfg.data.num_workers) as tok:
        for s in SPLIT_NAMES:
            texts = stages.split_texts(work, s, [task])
            summaries[s] = pack_split(cfg, work / "dataset", s, texts, tok, vocab, name_prefix=f"t{task:05d}")
    (work / "pack").mkdir(exist_ok=True)
    write_json_atomic(stages.task_file(work, "pack", task, ".json"), summaries)
    print(f"pack task {task}: " + ", ".join(f"{s} {summaries[s]['samples']} samples" for s in SPLIT_NAMES))


def _merged_splits(work: Path, tasks: int) -> dict:
    parts = [stages.result(work, "pack", t) for t in range(tasks)]
    splits = {}
    for s in SPLIT_NAMES:
        keys = ("documents", "samples", "tokens", "dropped_tail_tokens", "document_tokens")
        splits[s] = {k: sum(p[s][k] for p in parts) for k in keys}
        splits[s]["shards"] = [shard for p in parts for shard in p[s]["shards"]]
    return splits


def stage_finalize(cfg: RunConfig, work: Path, tasks: int) -> None:
    stats, maps, merged = stages.merge_results(work, tasks)
    info = {s: {**merged["splits"][s], "digests": MergedDigests(stages.digest_files(work, s, tasks))}
            for s in SPLIT_NAMES}  # fmt: skip
    report = stages.filter_report(cfg.data, maps, merged)
    dataset = work / "dataset"
    manifest = write_manifest(cfg, dataset, dataset_fingerprint(cfg), info, _merged_splits(work, tasks),
                              asdict(stats), report)  # fmt: skip
    manifest_note = f"{sum(len(v['shards']) for v in manifest['splits'].values())} shards"
    publish_dir(dataset, Path(cfg.data.output_dir).absolute())
    for stage in ("map", "dedup", "docs", "pack"):
        shutil.rmtree(work / stage, ignore_errors=True)
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
        cfg, work, task, tasks = load_config(args.config), Path(args.work), args.task, args.tasks
        if args.stage == "map":
            stage_map(cfg, work, task, tasks)
        elif args.stage == "dedup":
            stages.run_dedup(work, cfg.data, task, tasks)
        elif args.stage == "filter":
            stages.run_filter(cfg, work, task, tasks, stages.sample_rate(cfg, work, tasks))
        elif args.stage == "tokenizer":
            stage_tokenizer(cfg, work, tasks)
        elif args.stage == "pack":
            stage_pack(cfg, work, task)
        else:
            stage_finalize(cfg, work, tasks)
    except ShardforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
