"""SentencePiece tokenizer: train one on a sample of the training split, or reuse an existing ``.model``.

The trained model keeps text byte-exact (identity normalization, whitespace kept, byte fallback), which
source code needs. Special ids are fixed: ``<unk>``=0, ``<s>``=1, ``</s>``=2, ``<pad>``=3.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.config import TokenizerConfig
from core.errors import DataError, IntegrityError
from core.files import sha256_file

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MAX_SENTENCE_CHARS = 4000


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    """Cut documents at line ends into pieces SentencePiece's trainer accepts (newlines kept)."""
    for text in texts:
        buf = ""
        for line in text.split("\n"):
            if buf and len(buf) + len(line) + 1 > MAX_SENTENCE_CHARS:
                yield buf
                buf = ""
            buf += line[:MAX_SENTENCE_CHARS] + "\n"
        if buf:
            yield buf


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_file: Path, seed: int) -> None:
    """Train a SentencePiece model on ``texts`` and write it to ``out_file``."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            byte_fallback=cfg.byte_fallback,
            character_coverage=cfg.character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,
            user_defined_symbols=cfg.user_defined_symbols or [],
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            num_threads=len(os.sched_getaffinity(0)),  # all the cores this task has
            minloglevel=2,
        )
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        raise DataError(
            f"SentencePiece could not train a {cfg.vocab_size}-piece tokenizer: {first}",
            fix="adjust tokenizer.vocab_size as the message says, or give more text (tokenizer.sample_mb)",
        ) from None
    out_file.write_bytes(model.getvalue())


def load_tokenizer(path: str | Path, expected_sha256: str | None = None):
    """Load a SentencePiece model; if ``expected_sha256`` is given, refuse a file with another hash."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer model '{path}' does not exist", fix="check tokenizer.model_file")
    if expected_sha256 is not None and (actual := sha256_file(path)) != expected_sha256:
        raise IntegrityError(
            f"tokenizer '{path}' (sha256 {actual[:12]}) does not match the shards' manifest "
            f"(sha256 {expected_sha256[:12]})",
            fix="use the tokenizer the shards were made with, or re-run `shardforge data prepare`",
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError):
        raise DataError(f"'{path}' is not a SentencePiece model", fix="check tokenizer.model_file") from None
    return sp
