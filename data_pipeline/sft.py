"""Supervised fine-tuning data: prompt/response JSONL -> packed shards whose prompt tokens carry no loss.

Each example becomes ``prompt ids`` (stored negative: ``core.prompt_tokens``), ``response ids``, end-of-document;
examples are packed back to back into samples of ``seq_length + 1`` int32 tokens. The trainer reads the ids and
skips prompt positions in the loss, so the model learns to produce responses, not prompts. Splits are assigned by a
hash of the example, as for text. The tokenizer is the base model's (``tokenizer.model_file`` is required):
fine-tuning keeps the vocabulary.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from core.config import RunConfig
from core.errors import DataError
from core.prompt_tokens import encode_prompt
from data_pipeline.ingest import resolve_inputs
from data_pipeline.manifest import TOKENIZER_FILE, write_manifest
from data_pipeline.pack import SplitWriter
from data_pipeline.split import SPLIT_NAMES, DigestSet, assign_split, content_digest
from data_pipeline.tokenizer import load_tokenizer


def read_examples(cfg: RunConfig):
    """(prompt, response) pairs from every input JSONL file, naming file and line on a bad record."""
    d = cfg.data
    for path in resolve_inputs(d):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    prompt, response = rec[d.prompt_field], rec[d.response_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(
                        f"{path}:{n}: not a JSON object with '{d.prompt_field}' and '{d.response_field}'",
                        fix="set data.prompt_field / data.response_field, or fix the line",
                    ) from None
                if isinstance(prompt, str) and isinstance(response, str) and response:
                    yield prompt, response


def build_sft(cfg: RunConfig, work: Path, fingerprint: str) -> dict:
    """Write the SFT dataset into ``work`` (``prepare_dataset`` publishes it atomically); return the manifest."""
    if not cfg.tokenizer.model_file:
        raise DataError("data.format=sft needs the base model's tokenizer", fix="set tokenizer.model_file")
    tok_file = work / TOKENIZER_FILE
    tok_file.parent.mkdir(parents=True)
    shutil.copyfile(cfg.tokenizer.model_file, tok_file)
    sp = load_tokenizer(tok_file)
    (work / "documents").mkdir()
    docs = {s: open(work / "documents" / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLIT_NAMES}
    writers = {
        s: SplitWriter(work / s, s, cfg.data.seq_length + 1, np.dtype(np.int32), int(cfg.data.shard_size_mb * 1e6))
        for s in SPLIT_NAMES
    }
    info = {s: {"documents": 0, "bytes": 0, "digests": DigestSet()} for s in SPLIT_NAMES}
    examples = 0
    try:
        for prompt, response in read_examples(cfg):
            examples += 1
            digest = content_digest(prompt + "\0" + response)
            split = assign_split(digest, cfg.data.split)
            ids = encode_prompt(sp.encode(prompt)) + sp.encode(response)
            writers[split].add_document(np.array(ids, dtype=np.int32))
            docs[split].write(json.dumps({"digest": digest.hex()}) + "\n")
            info[split]["documents"] += 1
            info[split]["bytes"] += len((prompt + response).encode("utf-8"))
            info[split]["digests"].add(digest)
    finally:
        for f in docs.values():
            f.close()
    if examples == 0:
        raise DataError("data.inputs hold no prompt/response examples", fix="point data.inputs at JSONL files")
    splits = {}
    for s, w in writers.items():
        w.close()
        splits[s] = w.summary()
    ingest = {"files": len(resolve_inputs(cfg.data)), "documents": examples, "bytes": 0,
              "skipped_invalid_utf8": 0, "skipped_missing_field": 0, "skipped_files": []}  # fmt: skip
    report = {"stages": {}, "reasons": {}, "docs_out": examples, "bytes_out": 0}
    return write_manifest(cfg, work, fingerprint, info, splits, ingest, report, dtype="int32", kind="sft")
