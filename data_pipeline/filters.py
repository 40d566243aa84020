"""Clean, filter and deduplicate documents, counting what each stage drops.

Stages, in order: ``clean`` (Unicode NFC, control characters, newlines), ``length``, ``quality`` (symbol and
alphanumeric ratios, repeated lines; tuned so that source code passes, unlike web-prose filters),
``exact_dedup`` (sha256 of the cleaned text) and ``near_dedup`` (MinHash LSH from datasketch over word
n-grams). Every stage is deterministic for a given input order.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

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


class NearDuplicateIndex:
    """Streaming MinHash LSH: a document is a near-duplicate if it matches one already kept."""

    def __init__(self, threshold: float, num_perm: int, ngram: int, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        self._minhash = MinHash
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self.scheme = MinHash(num_perm=num_perm, seed=seed).scheme  # for signatures rebuilt from hash values
        self._count = 0

    def signature(self, text: str):
        m = self._minhash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(shingles(text, self.ngram)))
        return m

    def is_duplicate_else_add(self, text: str, hashvalues=None) -> bool:
        """``hashvalues``: the signature computed elsewhere (a Slurm array task), else computed here."""
        if hashvalues is None:
            sig = self.signature(text)
        else:
            sig = self._minhash(num_perm=self.num_perm, seed=self.seed, hashvalues=hashvalues, scheme=self.scheme)
        if self._lsh.query(sig):
            return True
        self._lsh.insert(str(self._count), sig)
        self._count += 1
        return False


class FilterPipeline:
    """Runs the stages over a document stream; ``report()`` gives per-stage counts."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.counts = {s: StageCount() for s in STAGES}
        self.reasons: dict[str, int] = {}
        self.docs_out = 0
        self.bytes_out = 0
        self._seen: set[bytes] = set()
        self._near = (
            NearDuplicateIndex(cfg.minhash_threshold, cfg.minhash_num_perm, cfg.minhash_ngram)
            if cfg.dedup_near
            else None
        )

    def _drop(self, stage: str, text: str, reason: str | None = None) -> None:
        c = self.counts[stage]
        c.docs_dropped += 1
        c.bytes_dropped += len(text.encode("utf-8"))
        if reason:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _keep(self, doc: Document) -> Document | None:
        text = self.prefilter(doc)
        if text is None or not self.deduplicate(text):
            return None
        return Document(doc.source, text)

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

    def deduplicate(self, text: str, hashvalues=None) -> bool:
        """The corpus-wide stages (exact, then near duplicates), in arrival order: True when ``text`` is kept."""
        self.counts["exact_dedup"].docs_in += 1
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        if self.cfg.dedup_exact and digest in self._seen:
            self._drop("exact_dedup", text)
            return False
        self._seen.add(digest)
        self.counts["near_dedup"].docs_in += 1
        if self._near is not None and self._near.is_duplicate_else_add(text, hashvalues):
            self._drop("near_dedup", text)
            return False
        return True

    def signature(self, text: str):
        """The MinHash signature's hash values (None without near-dedup), for :meth:`deduplicate` elsewhere."""
        return None if self._near is None else self._near.signature(text).hashvalues

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
        for doc in docs:
            kept = self._keep(doc)
            if kept is not None:
                self.docs_out += 1
                self.bytes_out += len(kept.text.encode("utf-8"))
                yield kept

    def report(self) -> dict:
        return {
            "stages": {s: asdict(c) for s, c in self.counts.items()},
            "reasons": dict(sorted(self.reasons.items())),
            "docs_out": self.docs_out,
            "bytes_out": self.bytes_out,
        }
