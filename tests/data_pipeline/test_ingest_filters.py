"""Ingest of every input format, bad-input handling, and the counted filter stages."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from core.config import DataConfig
from core.errors import DataError
from data_pipeline.filters import FilterPipeline, clean_text
from data_pipeline.ingest import Document, IngestStats, iter_documents


def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document one")
    (tmp_path / "b.md").write_text("# markdown\n\nsecond document")
    (tmp_path / "c.py").write_text("def f():\n    return 3\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    rows = [{"body": "jsonl one"}, {"body": "jsonl two"}]
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    (tmp_path / "d.jsonl").write_text(lines)
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return tmp_path


def test_every_format_is_ingested_in_a_stable_order(tmp_path):
    cfg = DataConfig(inputs=[str(corpus(tmp_path))], text_field="body")
    stats = IngestStats()
    docs = list(iter_documents(cfg, stats))
    assert [d.text for d in docs] == [
        "plain text document one",
        "# markdown\n\nsecond document",
        "def f():\n    return 3\n",
        "jsonl one",
        "jsonl two",
        "jsonl one",
        "jsonl two",
        "jsonl one",
        "jsonl two",
    ]
    assert docs[3].source.endswith("d.jsonl:1")
    assert (stats.files, stats.documents) == (6, 9)
    assert stats.bytes == sum(len(d.text.encode()) for d in docs)


def test_globs_and_max_documents(tmp_path):
    corpus(tmp_path)
    cfg = DataConfig(inputs=[str(tmp_path / "*.jsonl*")], text_field="body", max_documents=4)
    assert len(list(iter_documents(cfg))) == 4


def test_missing_text_field_fails_or_is_counted(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"other": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: no string field 'text'"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path)])))
    stats = IngestStats()
    docs = list(iter_documents(DataConfig(inputs=[str(tmp_path)], on_missing_field="skip"), stats))
    assert [d.text for d in docs] == ["ok"] and stats.skipped_missing_field == 2


def test_invalid_utf8_is_counted_or_fails_naming_the_file(tmp_path):
    (tmp_path / "good.txt").write_text("fine text")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    stats = IngestStats()
    docs = list(iter_documents(DataConfig(inputs=[str(tmp_path)]), stats))
    assert [d.text for d in docs] == ["fine text"]
    assert stats.skipped_invalid_utf8 == 1 and stats.skipped_files[0].endswith("bad.txt")
    with pytest.raises(DataError, match=r"bad.txt' is not valid UTF-8 \(byte 3\).*on_invalid_utf8=skip"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path)], on_invalid_utf8="fail")))


def test_missing_input_is_named(tmp_path):
    with pytest.raises(DataError, match="'.*nowhere' does not exist"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path / "nowhere")])))
    with pytest.raises(DataError, match="matches no file"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path / "*.nothing")])))


def test_clean_text_normalizes_and_strips_control_characters():
    assert clean_text("e\u0301\r\nx\x00y\x1b\tz\ufeff") == "\u00e9\nxy\tz"


def run_filters(texts, **kw):
    cfg = DataConfig(**{"min_chars": 10, **kw})
    pipe = FilterPipeline(cfg)
    kept = [d.text for d in pipe.run(Document(str(i), t) for i, t in enumerate(texts))]
    return kept, pipe.report()


def test_each_stage_drops_and_counts_what_it_should():
    words = [f"word{i} value{i * 7} item{i % 13}" for i in range(400)]
    base = " ".join(words)
    near = base.replace("word5 ", "wordfive ", 1)  # one word changed in ~1200
    other = " ".join(reversed(words[:200])) + " different tail text " * 3
    texts = [
        base,
        base,  # exact duplicate
        near,  # near duplicate
        other,
        "short",  # too short
        "abcd12!@#$%^&*()" * 4,  # mostly symbols
        "\n".join(["same line here"] * 20),  # repeated lines
        "\x00\x01\x02",  # empty after cleaning
    ]
    kept, report = run_filters(texts)
    assert kept == [base, other]
    stages = report["stages"]
    assert {k: v["docs_dropped"] for k, v in stages.items()} == {
        "clean": 1,
        "length": 1,
        "quality": 2,
        "exact_dedup": 1,
        "near_dedup": 1,
    }
    assert stages["exact_dedup"]["bytes_dropped"] == len(base)
    assert stages["near_dedup"]["bytes_dropped"] == len(near)
    assert report["reasons"] == {"empty_after_clean": 1, "repeated_lines": 1, "symbol_ratio": 1, "too_short": 1}
    assert report["docs_out"] == 2 and report["bytes_out"] == len(base) + len(other)


def test_dedup_can_be_switched_off():
    kept, _ = run_filters(["a document of some length"] * 3, dedup_exact=False, dedup_near=False)
    assert len(kept) == 3


def test_corrupt_compressed_inputs_are_one_line_errors_naming_the_file(tmp_path):
    lines = b'{"text": "a document"}\n' * 50
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(lines)[:-12])  # truncated
    (tmp_path / "bad.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(40)))  # zstd magic, then garbage
    for name, kind in (("bad.jsonl.gz", "gzip"), ("bad.jsonl.zst", "zstd")):
        with pytest.raises(DataError, match=rf"'{tmp_path / name}' is not a readable {kind} stream") as e:
            list(iter_documents(DataConfig(inputs=[str(tmp_path / name)])))
        assert "\n" not in str(e.value)


def test_a_jsonl_line_that_is_not_json_is_named_as_such(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON \(Unterminated string"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path)])))


def test_invalid_utf8_inside_a_jsonl_line_costs_that_line_or_fails_naming_it(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "first"}\n{"text": "caf\xe9"}\n{"text": "third"}\n')
    stats = IngestStats()
    docs = list(iter_documents(DataConfig(inputs=[str(tmp_path)]), stats))
    assert [d.text for d in docs] == ["first", "third"] and [d.source[-9:] for d in docs] == ["x.jsonl:1", "x.jsonl:3"]
    assert stats.skipped_invalid_utf8 == 1 and stats.skipped_files == [f"{tmp_path / 'x.jsonl'}:2"]
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid UTF-8 \(byte 13 of the line\)"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path)], on_invalid_utf8="fail")))


def test_max_chars_drops_long_documents_and_counts_them():
    texts = ["a reasonable document " * 5, "x" * 2000 + " long one", "another ordinary document " * 4]
    kept, report = run_filters(texts, max_chars=500)
    assert kept == [texts[0], texts[2]]
    assert report["stages"]["length"]["docs_dropped"] == 1 and report["stages"]["length"]["bytes_dropped"] == 2009
    assert report["reasons"] == {"too_long": 1}


def write_parquet(path, texts, column="content", row_group_size=3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), column: texts})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_text_column_is_read_batch_by_batch(tmp_path, monkeypatch):
    """Every row of the text column, in order, across batches of 2 rows and row groups of 3; null rows counted as
    missing; the same documents as the JSONL file holding the same texts."""
    monkeypatch.setattr("data_pipeline.ingest.PARQUET_BATCH_ROWS", 2)
    texts = [f"document number {i} " * (i + 3) for i in range(10)]
    write_parquet(tmp_path / "a.parquet", [*texts[:4], None, *texts[4:]])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    stats = IngestStats()
    cfg = DataConfig(inputs=[str(tmp_path / "a.parquet")], text_field="content")
    docs = list(iter_documents(cfg, stats))
    assert [d.text for d in docs] == texts and len(docs) == 10
    assert docs[4].source.endswith("a.parquet:6") and stats.skipped_missing_field == 1 and stats.documents == 10
    jsonl = DataConfig(inputs=[str(tmp_path / "b.jsonl")], text_field="content")
    assert [d.text for d in iter_documents(jsonl)] == [d.text for d in docs]
    limited = DataConfig(inputs=[str(tmp_path / "a.parquet")], text_field="content", max_documents=7)
    assert len(list(iter_documents(limited))) == 7


def test_a_corrupt_or_mismatched_parquet_file_is_named(tmp_path):
    write_parquet(tmp_path / "good.parquet", ["some text " * 10] * 5)
    raw = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "bad.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"'.*bad.parquet' is not a readable parquet file"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path / "bad.parquet")], text_field="content")))
    with pytest.raises(
        DataError, match=r"parquet file '.*good.parquet': it has no 'text' column \(columns: id, content\)"
    ):
        list(iter_documents(DataConfig(inputs=[str(tmp_path / "good.parquet")])))
    with pytest.raises(DataError, match=r"its 'id' column is int64"):
        list(iter_documents(DataConfig(inputs=[str(tmp_path / "good.parquet")], text_field="id")))
    stats = IngestStats()
    skip = DataConfig(inputs=[str(tmp_path / "good.parquet")], on_missing_field="skip")
    assert list(iter_documents(skip, stats)) == [] and stats.skipped_missing_field == 5
