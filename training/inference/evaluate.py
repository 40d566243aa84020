"""``shardforge eval``: test-split loss, perplexity and bits per byte, and multiple-choice tasks, from a checkpoint.

Loss is the mean next-token cross-entropy over every target token of the split's packed samples, over the padded
vocabulary (the training loss). Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the target tokens
stand for: a piece's bytes with '▁' as a space, 1 for a byte-fallback piece, 0 for control tokens, and no byte for
SentencePiece's dummy-prefix space at the start of a document; so models with different tokenizers compare.

Multiple-choice tasks (JSONL lines ``{"context": str, "choices": [str, ...], "answer": int}``, the HellaSwag/ARC
shape) are scored by log-likelihood: ``acc`` takes the choice with the highest summed log-probability of its
tokens after the context, ``acc_norm`` divides that by the choice's length in UTF-8 bytes (lm-eval's
``acc_bytes``). The scoring functions here are the ones the lm-eval adapter (``training/inference/harness.py``) calls.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.config import RunConfig, validate_config
from core.errors import ConfigError, DataError
from training.inference.decode import Decoder, token_log_probs

EOS_ID = 2


@dataclass
class LoadedModel:
    decoder: Decoder
    cfg: RunConfig
    step: int
    data_dir: str
    sp: object  # the SentencePiece processor of the dataset
    vocab: int


def load_model(checkpoint: str | Path, data_dir: str | None = None) -> LoadedModel:
    """The checkpoint's full weights in a :class:`Decoder`, its config, and the dataset's tokenizer."""
    from data_pipeline.sample_stream import load_dataset_manifest
    from data_pipeline.tokenizer import load_tokenizer
    from training.checkpoint.reader import ready_weights

    weights = ready_weights(checkpoint)  # LoRA fine-tunes are served merged (the tests hold merged to unmerged)
    cfg = validate_config(weights.config, f"{checkpoint}/trainer.json")
    if cfg.model.arch != "gpt":
        raise ConfigError(f"model.arch={cfg.model.arch}: evaluation and generation support the GPT model")
    root = data_dir or cfg.data.output_dir
    manifest = load_dataset_manifest(root)
    sp = load_tokenizer(Path(root) / manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"])
    decoder = Decoder(weights.tensors, cfg.model, max_positions=max(cfg.data.seq_length, 2048))
    if weights.int8_mode == "dynamic":
        decoder.quantize_dynamic()
    return LoadedModel(decoder, cfg, weights.step, root, sp, manifest["tokenizer"]["vocab_size"])


def piece_bytes(sp) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (see the module docstring)."""
    out = torch.zeros(sp.get_piece_size(), dtype=torch.float64)
    for i in range(sp.get_piece_size()):
        if sp.is_byte(i):
            out[i] = 1
        elif not (sp.is_control(i) or sp.is_unknown(i)):
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def split_metrics(model: LoadedModel, split: str = "test", max_samples: int | None = None) -> dict:
    """Loss, perplexity and bits per byte over ``split``'s samples (all, or the first ``max_samples``)."""
    from data_pipeline.sample_stream import SampleStream

    stream = SampleStream(model.data_dir, split, seed=0, shuffle=False)  # refuses an empty split
    n = stream.epoch_size if max_samples is None else min(max_samples, stream.epoch_size)
    samples = torch.from_numpy(np.stack(stream.read(0, n)).astype(np.int64))
    nats = -token_log_probs(model.decoder, samples).double()
    targets, before = samples[:, 1:], samples[:, :-1]
    sizes = piece_bytes(model.sp)[targets]
    dummy = (before == EOS_ID) & torch.tensor(
        [model.sp.id_to_piece(i).startswith("\u2581") for i in range(model.sp.get_piece_size())]
    )[targets]
    sizes = sizes - dummy.double()
    loss = float(nats.mean())
    return {
        "split": split,
        "samples": n,
        "tokens": int(targets.numel()),
        "bytes": int(sizes.sum()),
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": float(nats.sum() / math.log(2) / sizes.sum()),
        "gzip_bits_per_byte": gzip_bits_per_byte(model.sp, samples),
    }


def gzip_bits_per_byte(sp, samples: torch.Tensor) -> float:
    """A classical compressor's figure on the same text: the samples' tokens decoded back to documents (split at
    end-of-document tokens, joined by newlines) and compressed by gzip -9; compressed bits per UTF-8 byte."""
    import gzip

    from core.prompt_tokens import model_tokens

    ids = model_tokens(samples).reshape(-1).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == EOS_ID:
            docs.append(sp.decode(ids[start:i]))
            start = i + 1
    if start < len(ids):
        docs.append(sp.decode(ids[start:]))
    text = "\n".join(docs).encode("utf-8")
    return 8 * len(gzip.compress(text, compresslevel=9)) / max(len(text), 1)


def read_tasks(path: str | Path) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ok = isinstance(item["context"], str) and isinstance(item["choices"], list) and item["choices"]
                ok = ok and isinstance(item["answer"], int) and 0 <= item["answer"] < len(item["choices"])
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                raise DataError(
                    f"{path}:{n}: not a task line",
                    fix='write {"context": "...", "choices": ["...", "..."], "answer": 0} per line',
                )
            items.append(item)
    if not items:
        raise DataError(f"{path} holds no task lines")
    return items


def encode_pair(sp, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids, after the end-of-document token that every training document follows, and continuation ids,
    split as lm-eval splits them: the context's trailing spaces move to the continuation, and the whole text is
    encoded at once, so the tokens at the seam are those the model saw in training (at least one continuation
    token when the continuation is not empty)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = sp.encode(context + continuation)
    n = len(sp.encode(context)) if context else 0
    n = min(n, len(whole) - 1) if continuation else len(whole)
    return [EOS_ID, *whole[:n]], whole[n:]


def continuation_log_prob(model: LoadedModel, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Summed log-probability of ``cont`` after ``ctx`` (the input left-truncated to the context window), and
    whether greedy decoding would produce exactly ``cont``."""
    if not cont:
        return 0.0, True
    ids = (ctx + cont)[-(model.cfg.data.seq_length + 1) :]
    logits, _ = model.decoder(torch.tensor([ids[:-1]]))
    logits = logits[0, -len(cont) :]
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(cont)[:, None])
    greedy = bool((logits[:, : model.vocab].argmax(-1) == torch.tensor(cont)).all())
    return float(lp.sum()), greedy


def rolling_log_prob(model: LoadedModel, text: str, window: int | None = None) -> float:
    """Log-probability of a whole document after the end-of-document token: every token is predicted once, in
    windows of at most ``window`` input tokens, the last window with a full context (lm-eval's
    ``loglikelihood_rolling``)."""
    window = window or model.cfg.data.seq_length
    seq = [EOS_ID, *model.sp.encode(text)]
    total = 0.0
    for start in range(0, len(seq) - 1, window):  # predict seq[start + 1 : end + 1]
        end = min(start + window, len(seq) - 1)
        inputs = seq[max(0, end - window) : end + 1]
        lp = token_log_probs(model.decoder, torch.tensor([inputs]))[0]
        total += float(lp[-(end - start) :].sum())
    return total


def choice_log_likelihoods(model: LoadedModel, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each choice's tokens after the context (see :func:`encode_pair`)."""
    return [continuation_log_prob(model, *encode_pair(model.sp, context, c))[0] for c in choices]


def multiple_choice(model: LoadedModel, path: str | Path) -> dict:
    items = read_tasks(path)
    correct = correct_norm = 0
    for item in items:
        ll = choice_log_likelihoods(model, item["context"], item["choices"])
        norm = [x / max(len(c.encode("utf-8")), 1) for x, c in zip(ll, item["choices"])]
        correct += int(max(range(len(ll)), key=ll.__getitem__) == item["answer"])
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == item["answer"])
    return {
        "task": Path(path).stem,
        "items": len(items),
        "acc": correct / len(items),
        "acc_norm": correct_norm / len(items),
    }


def run_eval(
    model: LoadedModel, tasks: list[str], out: Path, tb_dir: str | None, split: str = "test", max_samples=None
) -> dict:
    """Every metric into ``out`` (JSON) and TensorBoard (``eval/...`` tags at the checkpoint's step)."""
    result = {"step": model.step, split: split_metrics(model, split, max_samples)}
    result["tasks"] = [multiple_choice(model, t) for t in tasks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if tb_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=tb_dir) as w:
            m = result[split]
            for key in ("loss", "perplexity", "bits_per_byte"):
                w.add_scalar(f"eval/{split}_{key}", m[key], model.step)
            for t in result["tasks"]:
                w.add_scalar(f"eval/{t['task']}/acc", t["acc"], model.step)
                w.add_scalar(f"eval/{t['task']}/acc_norm", t["acc_norm"], model.step)
    return result


def summary(result: dict, split: str = "test") -> str:
    m = result[split]
    lines = [
        f"evaluation at step {result['step']}: {split} split, {m['samples']} samples, {m['tokens']:,} tokens, "
        f"{m['bytes']:,} bytes",
        f"  loss {m['loss']:.4f} | perplexity {m['perplexity']:.2f} | bits per byte {m['bits_per_byte']:.4f} "
        f"(gzip -9 on the same text: {m['gzip_bits_per_byte']:.4f})",
    ]
    for t in result["tasks"]:
        lines.append(f"  task {t['task']}: {t['items']} items, acc {t['acc']:.3f}, acc_norm {t['acc_norm']:.3f}")
    return "\n".join(lines)
