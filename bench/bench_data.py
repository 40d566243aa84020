"""Data benchmarks: tokenize-and-pack throughput beside SentencePiece's own encode, and loader throughput beside
reading the same tar bytes raw. Usage: python bench/bench_data.py [--mb 8]"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed, write_result  # noqa: E402
from core.config import TokenizerConfig  # noqa: E402
from core.files import write_json_atomic  # noqa: E402
from data_pipeline.batch_loader import BatchLoader  # noqa: E402
from data_pipeline.ingest import default_corpus_files  # noqa: E402
from data_pipeline.manifest import FORMAT, MANIFEST  # noqa: E402
from data_pipeline.pack import EncoderPool, SplitWriter, token_dtype  # noqa: E402
from data_pipeline.sample_stream import SampleStream  # noqa: E402
from data_pipeline.tokenizer import train_tokenizer  # noqa: E402

SEQ = 2048


def corpus(mb: float) -> list[str]:
    texts, size = [], 0
    for f in default_corpus_files():
        try:
            t = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        texts.append(t)
        size += len(t)
        if size >= mb * 1e6:
            break
    return texts


def pack(model: Path, texts: list[str], workers: int, out: Path) -> SplitWriter:
    writer = SplitWriter(out / "train", "train", SEQ + 1, token_dtype(8000), 64_000_000)
    with EncoderPool(model, workers) as tok:
        for ids in tok.encode(texts):
            writer.add_document(ids)
    writer.close()
    write_json_atomic(out / MANIFEST, {"format": FORMAT, "splits": {"train": writer.summary()}})
    return writer


def tokens_written(w: SplitWriter) -> int:
    return w.samples * (SEQ + 1) + w.dropped_tail_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8.0)
    args = ap.parse_args()
    import sentencepiece as spm

    texts = corpus(args.mb)
    tmp = Path(tempfile.mkdtemp())
    model = tmp / "tok.model"
    train_tokenizer(texts[:200], TokenizerConfig(vocab_size=8000), model, seed=1)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    base_s, ids = timed(lambda: [sp.encode(t) for t in texts])
    tokens = sum(len(x) + 1 for x in ids)
    one_s, w1 = timed(pack, model, texts, 1, tmp / "w1")
    two_s, w2 = timed(pack, model, texts, 2, tmp / "w2")
    assert tokens_written(w1) == tokens_written(w2) == tokens
    # the loader over those shards (sha256-verified, decoded, batched) beside reading the same bytes raw
    shards = sorted((tmp / "w1" / "train").glob("*.tar"))
    raw_s, raw_bytes = timed(lambda: sum(len(p.read_bytes()) for p in shards))
    loader = BatchLoader(SampleStream(tmp / "w1", "train", shuffle=True), 8, 8)
    load_s, _ = timed(lambda: [loader.next_step() for _ in range(w1.samples // 8)])
    loaded = w1.samples // 8 * 8 * (SEQ + 1)
    write_result(
        "data",
        {
            "text_mb": round(sum(map(len, texts)) / 1e6, 2),
            "tokens": tokens,
            "sentencepiece_encode_tokens_per_s_1core": round(tokens / base_s),
            "pipeline_1worker_tokens_per_s": round(tokens / one_s),
            "pipeline_1worker_vs_encode": round(base_s / one_s, 3),
            "pipeline_2workers_tokens_per_s": round(tokens / two_s),
            "scaling_2_vs_1_workers": round(one_s / two_s, 3),
            "loader_tokens_per_s": round(loaded / load_s),
            "raw_tar_read_tokens_per_s": round(loaded / raw_s),
            "raw_tar_read_mb_per_s": round(raw_bytes / raw_s / 1e6, 1),
            "loader_vs_raw_read": round(raw_s / load_s, 3),
            "seq_length": SEQ,
            "notes": "pipeline = tokenize in N worker processes + pack + write shards with sha256; "
            "loader verifies every shard's sha256 and decodes every sample; raw read is bytes from page cache",
        },
    )


if __name__ == "__main__":
    main()
