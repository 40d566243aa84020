"""Parquet ingest: `data prepare`'s reader (documents of the text column, batch by batch, counted) beside pyarrow
reading the same column of the same file raw (batches, no Python strings), MB of text per second, same run.

Usage: python bench/bench_parquet.py [--mb 200]. Writes bench/results/parquet.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402


def make_file(path: Path, mb: int) -> int:
    """Documents of 200-4,000 random words, in row groups of 10,000 rows; returns the text bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), k)) for k in rng.integers(2, 10, 5000)])
    texts, total = [], 0
    while total < mb * 1e6:
        text = " ".join(words[rng.integers(0, len(words), rng.integers(200, 4000))])
        texts.append(text)
        total += len(text)
    pq.write_table(pa.table({"text": texts}), path, row_group_size=10_000)
    return total


def main() -> None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from core.config import DataConfig
    from data_pipeline.ingest import PARQUET_BATCH_ROWS, IngestStats, iter_documents

    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.parquet"
        text_bytes = make_file(path, args.mb)
        raw_s, ours_s = [], []
        for _ in range(3):  # alternating, the best of three each: the first read of a file warms caches
            t0 = time.perf_counter()
            batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"])
            raw = sum(pc.sum(pc.binary_length(b.column(0))).as_py() for b in batches)
            raw_s.append(time.perf_counter() - t0)
            stats = IngestStats()
            t0 = time.perf_counter()
            docs = sum(1 for _ in iter_documents(DataConfig(inputs=[str(path)]), stats))
            ours_s.append(time.perf_counter() - t0)
        raw_s, ours_s = min(raw_s), min(ours_s)
    assert raw == stats.bytes == text_bytes, (raw, stats.bytes, text_bytes)
    write_result(
        "parquet",
        {
            "text_mb": round(text_bytes / 1e6, 1),
            "documents": docs,
            "ingest_mb_per_s": round(text_bytes / 1e6 / ours_s, 1),
            "pyarrow_raw_mb_per_s": round(text_bytes / 1e6 / raw_s, 1),
            "ingest_vs_raw": round(raw_s / ours_s, 3),
            "notes": "one file, row groups of 10,000 documents, both read in batches of the same rows; ingest "
            "yields one Python string per document and counts its UTF-8 bytes, the raw read sums the column's byte "
            "lengths in pyarrow; best of three alternating runs each",
        },
    )


if __name__ == "__main__":
    main()
