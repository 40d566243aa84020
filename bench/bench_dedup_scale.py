"""Data preparation at corpus scale: memory of the largest task with 1, 2, 4 and 8 tasks, near-duplicate recall
beside today's datasketch LSH (streaming, one process) on the same signatures, and documents/s of the whole
preparation with 1 and 2 local workers. All in one run.

The corpus is synthetic (JSONL, random words): documents of 300-1,500 words, with planted exact copies (2%) and
near copies (3%, 0.5-2.5% of the words replaced: word 5-gram Jaccard about 0.78-0.95 to the original) placed in
random files. The task-count sweep runs the Slurm stage entry point (`python -m data_pipeline.slurm_stages`) as
local processes, two at a time (this machine's cores), each task's peak RSS read with wait4; it covers the stages
whose memory could grow with the corpus (map, dedup, filter). The tokenizer's memory is set by
tokenizer.sample_mb and pack streams its group, so they are not swept.

Usage: python bench/bench_dedup_scale.py [--mb 1024] [--files 32]. Writes bench/results/dedup_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402


def make_corpus(root: Path, mb: int, files: int) -> dict:
    """Write the corpus; returns the planted (original, copy) text pairs as digests."""
    import numpy as np

    from data_pipeline.split import content_digest

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, k)) for k in rng.integers(2, 10, 20000)])
    docs, exact, near, total = [], [], [], 0
    while total < mb * 1e6:
        r = rng.random()
        if docs and r < 0.02:
            src = docs[rng.integers(len(docs))]
            exact.append(len(docs))
            docs.append(src)
        elif docs and r < 0.05:
            i = int(rng.integers(len(docs)))
            words = docs[i].split(" ")
            k = max(1, int(len(words) * rng.uniform(0.005, 0.025)))
            for j in rng.choice(len(words), k, replace=False):
                words[j] = vocab[rng.integers(len(vocab))]
            near.append((content_digest(docs[i]).hex(), None))
            docs.append(" ".join(words))
            near[-1] = (near[-1][0], content_digest(docs[-1]).hex())
        else:
            docs.append(" ".join(vocab[rng.integers(0, len(vocab), rng.integers(300, 1500))]))
        total += len(docs[-1])
    order = rng.permutation(len(docs))  # copies land anywhere: before or after their original, any task
    root.mkdir(parents=True)
    for f, part in enumerate(np.array_split(order, files)):
        with open(root / f"part-{f:04d}.jsonl", "w") as out:
            out.writelines(json.dumps({"text": docs[i]}) + "\n" for i in part)
    return {"documents": len(docs), "bytes": total, "exact": len(exact), "near_pairs": near}


def write_config(path: Path, corpus: Path, out: Path, tasks: int, workers: int = 1) -> Path:
    import yaml

    raw = {"run_dir": str(path.parent / "run"),
           "data": {"inputs": [str(corpus)], "output_dir": str(out), "seq_length": 256, "num_workers": workers,
                    "split": [0.98, 0.01, 0.01], "min_chars": 32},
           "tokenizer": {"vocab_size": 1024, "sample_mb": 5},
           "slurm": {"array_tasks": tasks}}  # fmt: skip
    path.write_text(yaml.safe_dump(raw))
    return path


_RUNNER = """
import json, os, subprocess, sys
cmds, parallel = json.loads(sys.argv[1]), int(sys.argv[2])
pending, running, rss = list(enumerate(cmds)), {}, [0] * len(cmds)
while pending or running:
    while pending and len(running) < parallel:
        i, cmd = pending.pop(0)
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        running[p.pid] = (i, p)  # kept: a collected Popen object's child would be reaped by subprocess, not here
    pid, status, usage = os.wait4(-1, 0)
    if pid in running:
        i, p = running.pop(pid)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            sys.exit(f"{cmds[i]} failed")
        rss[i] = usage.ru_maxrss
print(json.dumps(rss))
"""


def run_tasks(cmds: list[list[str]], parallel: int = 2) -> list[int]:
    """Run commands ``parallel`` at a time; the peak RSS (KB) of each, from wait4. They are started by a small
    runner process: a child's peak RSS counts the memory of the process that forked it."""
    r = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(cmds), str(parallel)], cwd=REPO,
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout)


def sweep(tmp: Path, corpus: Path, tasks: int) -> dict:
    cfg = write_config(tmp / f"sweep{tasks}.yaml", corpus, tmp / f"out{tasks}", tasks)
    work = tmp / f".out{tasks}.slurm-work"
    base = [sys.executable, "-m", "data_pipeline.slurm_stages"]
    out = {"tasks": tasks}
    for stage in ("map", "dedup", "filter"):
        t0 = time.perf_counter()
        cmds = [[*base, stage, "-c", str(cfg), "--work", str(work), "--task", str(t), "--tasks", str(tasks)]
                for t in range(tasks)]  # fmt: skip
        rss = run_tasks(cmds)
        out[stage] = {"max_rss_mb": round(max(rss) / 1024, 1), "wall_s": round(time.perf_counter() - t0, 1)}
    kept = set()
    for f in (work / "docs").glob("*.digests"):
        data = f.read_bytes()
        kept.update(data[i : i + 32].hex() for i in range(0, len(data), 32))
    shutil.rmtree(work)
    out["max_rss_mb"] = max(out[s]["max_rss_mb"] for s in ("map", "dedup", "filter"))
    return out, kept


def datasketch_kept(corpus: Path) -> tuple[set[str], float]:
    """Today's rule before this change: exact by digest, then streaming MinHashLSH (query, insert if new), in the
    global input order, one process, on the same signatures (computed in 2 processes)."""
    import multiprocessing as mp

    import numpy as np
    from datasketch import MinHash, MinHashLSH

    from core.config import DataConfig
    from data_pipeline.filters import clean_text
    from data_pipeline.split import content_digest

    texts = []
    for f in sorted(corpus.glob("*.jsonl")):
        texts.extend(clean_text(json.loads(line)["text"]) for line in open(f))
    cfg = DataConfig()
    with mp.get_context("fork").Pool(2, initializer=_init_signer, initargs=(cfg,)) as pool:
        sigs = pool.map(_signature, texts, chunksize=256)
    import psutil

    scheme = MinHash(num_perm=cfg.minhash_num_perm, seed=1).scheme
    sigs = [np.asarray(h, dtype=np.uint64) for h in sigs]
    before = psutil.Process().memory_info().rss
    lsh, seen, kept = MinHashLSH(threshold=cfg.minhash_threshold, num_perm=cfg.minhash_num_perm), set(), set()
    for i, (text, hv) in enumerate(zip(texts, sigs)):
        d = content_digest(text).hex()
        if d in seen:
            continue
        seen.add(d)
        m = MinHash(num_perm=cfg.minhash_num_perm, seed=1, hashvalues=hv, scheme=scheme)
        if lsh.query(m):
            continue
        lsh.insert(str(i), m)
        kept.add(d)
    index_mb = (psutil.Process().memory_info().rss - before) / 2**20  # what the one dedup task held beyond base
    return kept, round(index_mb, 1)


_SIGNER = None


def _init_signer(cfg) -> None:
    global _SIGNER
    from data_pipeline.filters import MinHashSigner

    _SIGNER = MinHashSigner(cfg.minhash_num_perm, cfg.minhash_ngram)


def _signature(text: str):
    return _SIGNER.hashvalues(text)


def recall(pairs: list, kept: set[str]) -> float:
    found = sum(1 for a, b in pairs if not (a in kept and b in kept))
    return round(found / max(len(pairs), 1), 4)


def whole_prepare(tmp: Path, corpus: Path, workers: int) -> dict:
    cfg = write_config(tmp / f"whole{workers}.yaml", corpus, tmp / f"whole{workers}", 1, workers)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "data", "prepare", "-c", str(cfg)], cwd=REPO,
                       capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    m = json.loads((tmp / f"whole{workers}" / "manifest.json").read_text())
    docs = m["ingest"]["documents"]
    return {"workers": workers, "documents": docs, "wall_s": round(wall, 1), "docs_per_s": round(docs / wall, 1),
            "mb_per_s": round(m["ingest"]["bytes"] / 1e6 / wall, 2)}  # fmt: skip


def main() -> None:
    import multiprocessing as mp

    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=32)
    ap.add_argument("--whole-mb", type=int, default=128, help="corpus size for the whole-preparation rates")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as t:
        tmp = Path(t)
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(1) as pool:  # generated in a child: this process stays small
            truth = pool.apply(make_corpus, (tmp / "corpus", args.mb, args.files))
        print(f"corpus: {truth['documents']} documents, {truth['bytes'] / 1e6:.0f} MB in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        runs, kept_sets = [], []
        for tasks in (1, 2, 4, 8):
            res, kept = sweep(tmp, tmp / "corpus", tasks)
            runs.append(res)
            kept_sets.append(kept)
            print(json.dumps(res), flush=True)
        baseline, index_mb = datasketch_kept(tmp / "corpus")
        small = tmp / "small"
        small.mkdir()
        n_small = max(1, round(args.files * args.whole_mb / args.mb))
        for f in sorted((tmp / "corpus").glob("*.jsonl"))[:n_small]:
            shutil.copyfile(f, small / f.name)
        whole = [whole_prepare(tmp, small, w) for w in (1, 2)]
    pairs = truth["near_pairs"]
    write_result("dedup_scale", {
        "corpus": {"documents": truth["documents"], "mb": round(truth["bytes"] / 1e6, 1),
                   "planted_exact": truth["exact"], "planted_near": len(pairs)},
        "tasks_sweep": runs,
        "same_documents_kept_at_every_task_count": all(k == kept_sets[0] for k in kept_sets),
        "near_recall": {"split_dedup": recall(pairs, kept_sets[0]),
                        "datasketch_streaming_lsh": recall(pairs, baseline)},
        "before_one_dedup_task_index_mb": index_mb,
        "documents_kept": {"split_dedup": len(kept_sets[0]), "datasketch_streaming_lsh": len(baseline)},
        "whole_prepare": whole,
        "whole_prepare_speedup_2_workers": round(whole[1]["docs_per_s"] / whole[0]["docs_per_s"], 2),
    })  # fmt: skip


if __name__ == "__main__":
    main()
