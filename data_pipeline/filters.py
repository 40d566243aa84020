"""Clean, filter and deduplicate documents, counting what each stage drops.

Stages, in order: ``clean`` (Unicode NFC, control characters, newlines), ``length``, ``quality`` (symbol and
alphanumeric ratios, repeated lines; tuned so that source code passes, unlike web-prose filters),
``exact_dedup`` (sha256 of the cleaned text) and ``near_dedup`` (MinHash signatures from datasketch over word
n-grams, banded and compared in :mod:`data_pipeline.dedup`). Every stage is deterministic for a given input order.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import xxhash

from core.config import DataConfig
from data_pipeline.ingest import Document

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")
_ALNUM = re.compile(r"[^\W_]")
_SPACE = re.compile(r"\s")
_WORD = re.compile(r"\w+")

STAGES = ("clean", "length", "quality", "exact_dedup", "near_dedup")


@dataclass
class StageCount:
    docs_in: int = 0
    docs_dropped: int = 0
    bytes_dropped: int = 0


def clean_text(text: str) -> str:
    """NFC-normalize, unify newlines, drop control characters (tabs and newlines stay)."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _CONTROL.sub("", text)


def quality_problem(text: str, cfg: DataConfig) -> str | None:
    """Why a document fails the quality heuristics, or None when it passes."""
    n = len(text)
    alnum = n - len(_ALNUM.sub("", text))
    space = n - len(_SPACE.sub("", text))
    if alnum / n < cfg.min_alnum_ratio:
        return "alnum_ratio"
    if (n - alnum - space) / n > cfg.max_symbol_ratio:
        return "symbol_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if len(lines) >= 4:
        repeated = len(lines) - len(set(lines))
        if repeated / len(lines) > cfg.max_repeated_line_frac:
            return "repeated_lines"
    return None


def shingles(text: str, n: int) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode("utf-8")}
    return {" ".join(words[i : i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


class MinHashSigner:
    """MinHash signatures of word n-gram shingles (datasketch); :mod:`data_pipeline.dedup` bands and compares them.

    Shingles are hashed with xxh32 (2.2x faster than datasketch's default sha1 here, 32 bits as its default)."""

    def __init__(self, num_perm: int, ngram: int, seed: int = 1):
        from datasketch import MinHash

        self._minhash = MinHash
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        first = MinHash(num_perm=num_perm, seed=seed)
        self._permutations, self._scheme = first.permutations, first.scheme  # shared: built once

    def hashvalues(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=self.seed, permutations=self._permutations,
                          scheme=self._scheme, hashfunc=xxhash.xxh32_intdigest)  # fmt: skip
        m.update_batch(list(shingles(text, self.ngram)))
        return m.hashvalues


class FilterPipeline:
    """Runs the stages over a document stream; ``report()`` gives per-stage counts."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.counts = {s: StageCount() for s in STAGES}
        self.reasons: dict[str, int] = {}
        self.docs_out = 0
        self.bytes_out = 0
        self._signer = MinHashSigner(cfg.minhash_num_perm, cfg.minhash_ngram) if cfg.dedup_near else None

    def _drop(self, stage: str, text: str, reason: str | None = None) -> None:
        c = self.counts[stage]
        c.docs_dropped += 1
        c.bytes_dropped += len(text.encode("utf-8"))
        if reason:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def prefilter(self, doc: Document) -> str | None:
        """The per-document stages (clean, length, quality): the cleaned text, or None when dropped."""
        cfg = self.cfg
        self.counts["clean"].docs_in += 1
        text = clean_text(doc.text)
        if not text.strip():
            self._drop("clean", doc.text, "empty_after_clean")
            return None
        self.counts["length"].docs_in += 1
        if not cfg.min_chars <= len(text) <= cfg.max_chars:
            self._drop("length", text, "too_short" if len(text) < cfg.min_chars else "too_long")
            return None
        self.counts["quality"].docs_in += 1
        problem = quality_problem(text, cfg)
        if problem:
            self._drop("quality", text, problem)
            return None
        return text

    def signature(self, text: str):
        """The MinHash signature's hash values (None without near-dedup), for :mod:`data_pipeline.dedup`."""
        return None if self._signer is None else self._signer.hashvalues(text)

    def count_dedup(self, docs_in: int, dropped: dict[str, list[int]]) -> None:
        """Count the corpus-wide stages: ``docs_in`` documents reached them; ``dropped[stage]`` = [docs, bytes]."""
        self.counts["exact_dedup"].docs_in += docs_in
        self.counts["near_dedup"].docs_in += docs_in - dropped["exact_dedup"][0]
        for stage, (docs, nbytes) in dropped.items():
            self.counts[stage].docs_dropped += docs
            self.counts[stage].bytes_dropped += nbytes

    def absorb(self, report: dict) -> None:
        """Add another pipeline's counts (a Slurm array task's per-document stages) to these."""
        for stage, c in report["stages"].items():
            mine = self.counts[stage]
            mine.docs_in += c["docs_in"]
            mine.docs_dropped += c["docs_dropped"]
            mine.bytes_dropped += c["bytes_dropped"]
        for reason, n in report["reasons"].items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        """All stages over an in-memory stream (one task): the same rule as the split pipeline's."""
        from data_pipeline.dedup import RecordWriter, find_removals, removals_for_task

        texts = [t for t in (self.prefilter(d) for d in docs) if t is not None]
        records = RecordWriter(self.cfg, task=0, partitions=1)
        for text in texts:
            records.add(hashlib.sha256(text.encode("utf-8")).digest(), self.signature(text), held=False)
        removed = removals_for_task([find_removals(records.array(), self.cfg.dedup_exact, self.cfg.dedup_near)], 0)
        dropped = {"exact_dedup": [0, 0], "near_dedup": [0, 0]}
        for i, text in enumerate(texts):
            if i in removed:
                stage = dedup_stage(removed[i])
                if stage:
                    dropped[stage][0] += 1
                    dropped[stage][1] += len(text.encode("utf-8"))
                continue
            self.docs_out += 1
            self.bytes_out += len(text.encode("utf-8"))
            yield Document("", text)
        self.count_dedup(len(texts), dropped)

    def report(self) -> dict:
        return {
            "stages": {s: asdict(c) for s, c in self.counts.items()},
            "reasons": dict(sorted(self.reasons.items())),
            "docs_out": self.docs_out,
            "bytes_out": self.bytes_out,
        }


def dedup_stage(reason: int) -> str | None:
    """The report stage a removal reason of :mod:`data_pipeline.dedup` counts in (a held-out copy: none)."""
    from data_pipeline.dedup import EXACT, NEAR

    return {EXACT: "exact_dedup", NEAR: "near_dedup"}.get(reason)
