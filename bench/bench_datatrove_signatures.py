"""MinHash signatures: datatrove 0.10.1's signature stage (MinhashDedupSignature, 9 bands x 13 hashes as ours, a
regex word splitter) beside Shardforge's map-stage records (datasketch signatures, banded, sorted into partitions),
on the same documents, one process each, in the same run. datatrove is not a Shardforge dependency: install it
aside first, e.g. `pip install --target /tmp/dtlib "datatrove[processing]==0.10.1" orjson`.

Usage: python bench/bench_datatrove_signatures.py --datatrove /tmp/dtlib [--docs 3000].
Writes bench/results/datatrove_signatures.json.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import write_result  # noqa: E402


def documents(n: int) -> list[str]:
    """Documents of 300-1,500 random words (the dedup benchmark's kind)."""
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(["".join(rng.choice(letters, k)) for k in rng.integers(2, 10, 20000)])
    return [" ".join(vocab[rng.integers(0, len(vocab), rng.integers(300, 1500))]) for _ in range(n)]


def datatrove_seconds(texts: list[str]) -> float:
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Words(WordTokenizer):
        def word_tokenize(self, text):
            return re.findall(r"\w+", text)

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    sig = MinhashDedupSignature(tempfile.mkdtemp(), MinhashConfig(num_buckets=9, hashes_per_bucket=13), Words())
    t0 = time.perf_counter()
    sig.run(data=(Document(text=t, id=str(i)) for i, t in enumerate(texts)), rank=0, world_size=1)
    return time.perf_counter() - t0


def shardforge_seconds(texts: list[str]) -> float:
    from core.config import DataConfig
    from data_pipeline.dedup import RecordWriter, banding
    from data_pipeline.filters import MinHashSigner
    from data_pipeline.split import content_digest

    assert banding(0.8, 128) == (9, 13)
    signer, writer = MinHashSigner(128, 5), RecordWriter(DataConfig(), 0, 4)
    t0 = time.perf_counter()
    for t in texts:
        writer.add(content_digest(t), signer.hashvalues(t), held=False)
    writer.save(Path(tempfile.mkdtemp()) / "records.npy")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datatrove", required=True, help="a folder where datatrove[processing] and orjson are installed")
    ap.add_argument("--docs", type=int, default=3000)
    args = ap.parse_args()
    sys.path.insert(0, args.datatrove)
    texts = documents(args.docs)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    rounds = [(datatrove_seconds(texts), shardforge_seconds(texts)) for _ in range(2)]  # alternating, best of two
    dt, ours = min(r[0] for r in rounds), min(r[1] for r in rounds)
    write_result("datatrove_signatures", {
        "documents": len(texts), "mb": round(mb, 1),
        "datatrove_signature_mb_per_s": round(mb / dt, 2), "shardforge_map_mb_per_s": round(mb / ours, 2),
        "shardforge_over_datatrove": round(dt / ours, 2),
    })  # fmt: skip


if __name__ == "__main__":
    main()
