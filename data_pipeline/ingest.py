"""Ingest: turn inputs (files, directories, globs; text, JSONL optionally gzip/zstd, parquet) into documents.

Owns the built-in default corpus (this Python's standard library sources, found through ``sysconfig``) and the
counted handling of bad input: invalid UTF-8, JSONL records without the text field, unreadable files.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from core.config import DataConfig
from core.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


@dataclass(frozen=True)
class Document:
    source: str
    """Where it came from: ``path`` or ``path:line`` for JSONL."""
    text: str


@dataclass
class IngestStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_invalid_utf8: int = 0
    skipped_missing_field: int = 0
    skipped_files: list[str] = field(default_factory=list)


def default_corpus_root() -> Path:
    """The standard library of the running Python: real text present wherever Shardforge runs."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files() -> list[Path]:
    root = default_corpus_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _has_suffix(path: Path, suffixes: list[str] | tuple[str, ...]) -> bool:
    name = path.name
    return any(name.endswith(s) for s in suffixes)


def resolve_inputs(cfg: DataConfig) -> list[Path]:
    """Expand ``data.inputs`` into a sorted, de-duplicated list of files; fail naming a missing input."""
    if not cfg.inputs:
        return default_corpus_files()
    files: list[Path] = []
    for item in cfg.inputs:
        p = Path(item)
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and _has_suffix(f, cfg.extensions)]
        elif p.is_file():
            files.append(p)
        elif glob.has_magic(item):
            matched = [Path(m) for m in glob.glob(item, recursive=True)]
            files += [f for f in matched if f.is_file()]
            if not matched:
                raise DataError(f"data.inputs: glob '{item}' matches no file", fix="check the pattern")
        else:
            raise DataError(f"data.inputs: '{item}' does not exist", fix="give an existing file, directory or glob")
    return sorted(set(files))


def _open_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read input file '{path}': {e.strerror}", fix="check its permissions") from None
    try:
        if path.name.endswith(".gz"):
            return gzip.decompress(raw)
        if path.name.endswith(".zst"):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                return reader.read()
    except Exception as e:  # noqa: BLE001 - gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError: all one answer
        kind = "gzip" if path.name.endswith(".gz") else "zstd"
        raise DataError(
            f"input file '{path}' is not a readable {kind} stream ({' '.join(str(e).split()) or type(e).__name__})",
            fix="download or compress it again, or remove it from data.inputs",
        ) from None
    return raw


def _decode(path: Path, raw: bytes, cfg: DataConfig, stats: IngestStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if cfg.on_invalid_utf8 == "fail":
            raise DataError(
                f"input file '{path}' is not valid UTF-8 (byte {e.start})",
                fix="convert it to UTF-8, or set data.on_invalid_utf8=skip to count and skip such files",
            ) from None
        stats.skipped_invalid_utf8 += 1
        stats.skipped_files.append(str(path))
        return None


def _jsonl_line(path: Path, lineno: int, raw: bytes, cfg: DataConfig, stats: IngestStats) -> object:
    """One JSONL line's record; None for a line skipped per ``data.on_invalid_utf8`` / ``data.on_missing_field``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if cfg.on_invalid_utf8 == "fail":
            raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start} of the line)",
                            fix="convert the file to UTF-8, or set data.on_invalid_utf8=skip to count and skip such "
                            "lines") from None  # fmt: skip
        stats.skipped_invalid_utf8 += 1
        stats.skipped_files.append(f"{path}:{lineno}")
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        if cfg.on_missing_field == "fail":
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})",
                            fix="fix or remove the line, or set data.on_missing_field=skip to count and skip bad "
                            "records") from None  # fmt: skip
        stats.skipped_missing_field += 1
        return None


def _jsonl_documents(path: Path, raw: bytes, cfg: DataConfig, stats: IngestStats) -> Iterator[Document]:
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        record = _jsonl_line(path, lineno, line, cfg, stats)
        if record is None:
            continue
        value = record.get(cfg.text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            if cfg.on_missing_field == "fail":
                raise DataError(
                    f"{path}:{lineno}: no string field '{cfg.text_field}' in this JSONL record",
                    fix="set data.text_field to the field holding the text, or data.on_missing_field=skip",
                )
            stats.skipped_missing_field += 1
            continue
        yield Document(f"{path}:{lineno}", value)


PARQUET_BATCH_ROWS = 1024


def _parquet_documents(path: Path, cfg: DataConfig, stats: IngestStats) -> Iterator[Document]:
    """The ``data.text_field`` column of a parquet file, read a batch of rows at a time (never the whole file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = "download it again or remove it from data.inputs"
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"input file '{path}' is not a readable parquet file ({' '.join(str(e).split())})",
                        fix=fix) from None  # fmt: skip
    names = pf.schema_arrow.names
    field = pf.schema_arrow.field(cfg.text_field) if cfg.text_field in names else None
    if field is None or not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        if cfg.on_missing_field == "fail":
            what = f"its '{cfg.text_field}' column is {field.type}" if field else f"it has no '{cfg.text_field}' column"
            raise DataError(f"parquet file '{path}': {what} (columns: {', '.join(names)})",
                            fix="set data.text_field to the string column holding the text, or "
                            "data.on_missing_field=skip to count and skip such files")  # fmt: skip
        stats.skipped_files.append(str(path))
        stats.skipped_missing_field += pf.metadata.num_rows
        return
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[cfg.text_field]):
            for value in batch.column(0).to_pylist():
                row += 1
                if value is None:
                    stats.skipped_missing_field += 1
                    continue
                yield Document(f"{path}:{row}", value)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"parquet file '{path}' is damaged after row {row} ({' '.join(str(e).split())})",
                        fix=fix) from None  # fmt: skip


def iter_documents(
    cfg: DataConfig, stats: IngestStats | None = None, files: list[Path] | None = None
) -> Iterator[Document]:
    """Yield documents from every input (or from ``files``, a slice of them) in a stable order, counting what is
    skipped in ``stats``."""
    stats = stats if stats is not None else IngestStats()
    for path in resolve_inputs(cfg) if files is None else files:
        if path.name.endswith(".parquet"):
            stats.files += 1
            yield from _limited(_parquet_documents(path, cfg, stats), cfg, stats)
            if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
                return
            continue
        raw = _open_bytes(path)
        if _has_suffix(path, JSONL_SUFFIXES):  # decoded line by line: one bad line costs that line, not the file
            stats.files += 1
            docs = _jsonl_documents(path, raw, cfg, stats)
        else:
            text = _decode(path, raw, cfg, stats)
            if text is None:
                continue
            stats.files += 1
            docs = [Document(str(path), text)]
        yield from _limited(docs, cfg, stats)
        if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
            return


def _limited(docs, cfg: DataConfig, stats: IngestStats) -> Iterator[Document]:
    """Count each document; stop at ``data.max_documents``."""
    for doc in docs:
        if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
            return
        stats.documents += 1
        stats.bytes += len(doc.text.encode("utf-8"))
        yield doc
