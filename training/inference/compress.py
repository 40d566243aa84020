"""``shardforge quantize`` and ``shardforge prune``: smaller models for CPU serving, measured in the same run.

Quantization (int8) of the matrices of the transformer blocks and the output head (embedding and norms stay fp32):

- ``dynamic``: torch.ao dynamic quantization, int8 weights per output channel and activations quantized per batch
  on the fly (fbgemm/x86 kernels): smaller and faster on CPU.
- ``weight-only``: int8 weights with one fp32 scale per output channel, dequantized when loaded: smaller on disk,
  computed in fp32.

Both write ``model-int8.safetensors`` + ``config.json`` into ``--out``; ``shardforge eval|generate --checkpoint OUT``
load it. Pruning by magnitude: ``unstructured`` (the smallest |w| of each matrix) or ``N:M`` (N of every M
consecutive weights along the input dimension kept); it writes a consolidated folder (``model.safetensors`` +
``config.json``) that ``model.init_from=ckpt:OUT`` with ``train.keep_sparsity=true`` fine-tunes without refilling
the zeros. Each command reports size or sparsity, perplexity and generation tokens/s beside the original model's.
"""

from __future__ import annotations

import dataclasses
import json
import time

import torch
from safetensors.torch import save_file

from core.errors import ConfigError
from core.files import staged_output
from training.inference.decode import Decoder, Sampling, generate
from training.inference.evaluate import LoadedModel, load_model, split_metrics

QUANT_FILE = "model-int8.safetensors"


def generation_speed(decoder: Decoder, prompt: list[int], vocab: int, tokens: int = 64) -> float:
    """Greedy tokens per second with the KV cache (one warm-up token first)."""
    list(generate(decoder, prompt, vocab, Sampling(1, 0.0)))
    start = time.perf_counter()
    n = len(list(generate(decoder, prompt, vocab, Sampling(tokens, 0.0))))
    return n / (time.perf_counter() - start)


def _measure(model: LoadedModel, max_samples: int | None, gen_tokens: int) -> dict:
    prompt = model.sp.encode("def main(argv):\n")
    m = split_metrics(model, "test", max_samples)
    speed = generation_speed(model.decoder, prompt, model.vocab, gen_tokens)
    return {"test_loss": m["loss"], "perplexity": m["perplexity"], "generate_tokens_per_s": speed}


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output row: w ~= q * scale[:, None]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.float()


def quantize(checkpoint: str, out: str, mode: str = "dynamic", data: str | None = None, max_samples: int | None = None,
             gen_tokens: int = 64, overwrite: bool = False) -> dict:  # fmt: skip
    model = load_model(checkpoint, data)
    with staged_output(out, overwrite) as tmp:
        names = set(model.decoder.linear_names())
        stored, fp32_bytes = {}, 0
        for name, w in model.decoder.w.items():
            fp32_bytes += w.numel() * 4
            if name in names:
                stored[name], stored[name + ".scale"] = int8_per_channel(w)
            else:
                stored[name] = w.contiguous()
        save_file(
            stored,
            str(tmp / QUANT_FILE),
            metadata={"format": "shardforge-int8/1", "mode": mode, "step": str(model.step)},
        )
        (tmp / "config.json").write_text(json.dumps(model.cfg.model_dump(mode="json"), indent=1))
        before = _measure(model, max_samples, gen_tokens)
        quantized = dataclasses.replace(model, decoder=decoder_from_int8(stored, model.decoder.m, mode))
        after = _measure(quantized, max_samples, gen_tokens)
        report = {
            "mode": mode,
            "fp32_bytes": fp32_bytes,
            "int8_file_bytes": (tmp / QUANT_FILE).stat().st_size,
            "original": before,
            "quantized": after,
            "perplexity_ratio": after["perplexity"] / before["perplexity"],
            "speedup": after["generate_tokens_per_s"] / before["generate_tokens_per_s"],
        }
        (tmp / "quantization.json").write_text(json.dumps(report, indent=1))
    return report


def decoder_from_int8(stored: dict[str, torch.Tensor], m, mode: str) -> Decoder:
    """A Decoder from ``model-int8.safetensors`` tensors: dequantized weights, then torch.ao modules if dynamic."""
    weights = {}
    for name, t in stored.items():
        if name.endswith(".scale"):
            continue
        weights[name] = t.float() * stored[name + ".scale"][:, None] if t.dtype == torch.int8 else t
    decoder = Decoder(weights, m)
    if mode == "dynamic":
        decoder.quantize_dynamic()
    return decoder


def prune_matrix(w: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None) -> torch.Tensor:
    if nm is not None:
        n, m = nm
        if w.shape[1] % m:
            raise ConfigError(f"--nm {n}:{m}: a matrix has {w.shape[1]} inputs, not a multiple of {m}")
        groups = w.reshape(w.shape[0], -1, m)
        keep = groups.abs().topk(n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
        return (groups * mask).reshape_as(w)
    k = int(round(sparsity * w.numel()))
    if k == 0:
        return w.clone()
    threshold = w.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() <= threshold, torch.zeros_like(w), w)


def prune(checkpoint: str, out: str, sparsity: float | None = None, nm: str | None = None, data: str | None = None,
          max_samples: int | None = None, overwrite: bool = False) -> dict:  # fmt: skip
    if (sparsity is None) == (nm is None):
        raise ConfigError("give exactly one of --sparsity S (unstructured) and --nm N:M (structured)")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise ConfigError(f"--sparsity {sparsity} must be in [0, 1)")
    pattern = tuple(int(x) for x in nm.split(":")) if nm else None
    if pattern is not None and not (len(pattern) == 2 and 0 < pattern[0] <= pattern[1]):
        raise ConfigError(f"--nm {nm} is not N:M with 0 < N <= M", fix="e.g. --nm 2:4")
    model = load_model(checkpoint, data)
    with staged_output(out, overwrite) as tmp:
        weights = dict(model.decoder.w)
        names = model.decoder.linear_names()
        for name in names:
            weights[name] = prune_matrix(weights[name], sparsity, pattern)
        zeros = sum(int((weights[n] == 0).sum()) for n in names)
        total = sum(weights[n].numel() for n in names)
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "shardforge-consolidated/1", "step": str(model.step)})  # fmt: skip
        (tmp / "config.json").write_text(json.dumps(model.cfg.model_dump(mode="json"), indent=1))
        before = split_metrics(model, "test", max_samples)
        after = split_metrics(
            dataclasses.replace(model, decoder=Decoder(weights, model.cfg.model)), "test", max_samples
        )
        report = {
            "method": f"{nm} structured" if nm else "unstructured",
            "sparsity": zeros / total,
            "pruned_matrices": len(names),
            "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"],
        }
        (tmp / "pruning.json").write_text(json.dumps(report, indent=1))
    return report
