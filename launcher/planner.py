"""``shardforge plan``: what a run will take before it runs: memory per device, step time, GPU-hours and cost.

Parameters and FLOPs per token come from ``training.model.flops`` (the same numbers the training log's MFU uses);
device figures from ``parallelism/devices.json``. Memory per device for a layout (bytes):

- weights: bf16 2 B/param (fp32 4), divided by dp under ZeRO-3;
- gradients: 2 B/param (fp32 4), divided by dp under ZeRO-2/3;
- optimizer (Adam): fp32 moments 8 B/param plus an fp32 master copy 4 B/param in bf16; divided by dp under
  ZeRO >= 1;
- activations per transformer layer and micro-batch, after Korthikanti et al. (2022):
  ``s*b*h*(10 + 24/tp)`` bytes (``34/tp`` with sequence parallelism), plus ``5*a*s*s*b/tp`` for the attention
  matrix when it is stored (megatron's attention without selective recompute; SDPA does not store it); with
  full recompute only each layer's input ``2*s*b*h/tp``; the first pipeline stage keeps ``min(pp, gas)``
  micro-batches in flight; plus the fp32 logits of one micro-batch, ``4*s*b*V/tp``;
- a fixed 1 GiB for the framework and buffers.

Step time = FLOPs per step / (GPUs x peak x MFU), stretched by the pipeline bubble ``(pp-1)/(gas+pp-1)``, by
4/3 for full recompute (one more forward pass), and by the assumed overheads of ``overhead_factor``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from core.config import RunConfig
from training.model.flops import gpt_parameter_count, load_devices, training_flops_per_token
from training.model.gpt import padded_vocab

GIB = 2**30


@dataclass
class CandidateLayout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    recompute: str
    sequence_parallel: bool = False


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float = GIB

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead


def params_per_device(cfg: RunConfig, vocab: int, tp: int, pp: int) -> float:
    """Parameters on the busiest device: its share of the layers plus the embedding or the head."""
    m = cfg.model
    total = gpt_parameter_count(m, vocab, cfg.data.seq_length)
    embed = padded_vocab(vocab) * m.hidden_size
    head = 0 if m.tie_embeddings else embed
    layers = total - embed - head - (cfg.data.seq_length * m.hidden_size if m.position_embedding == "learned" else 0)
    return (layers / pp + max(embed, head if pp > 1 else embed + head)) / tp


def memory(cfg: RunConfig, vocab: int, lay: CandidateLayout, bf16: bool = True) -> MemoryEstimate:
    m = cfg.model
    p = params_per_device(cfg, vocab, lay.tp, lay.pp)
    wbytes = 2 if bf16 else 4
    weights = p * wbytes / (lay.dp if lay.zero >= 3 else 1)
    grads = p * wbytes / (lay.dp if lay.zero >= 2 else 1)
    optim = p * ((8 + 4) if bf16 else 8) / (lay.dp if lay.zero >= 1 else 1)
    s, b, h, a, tp = cfg.data.seq_length, lay.micro_batch, m.hidden_size, m.num_attention_heads, lay.tp
    if lay.recompute == "full":
        per_layer = 2 * s * b * h / tp
    else:
        per_layer = s * b * h * ((34 / tp) if lay.sequence_parallel else (10 + 24 / tp))
        if m.attention == "megatron" and lay.recompute != "selective":
            per_layer += 5 * a * s * s * b / tp
    gas = cfg.train.global_batch_size // (lay.micro_batch * lay.dp)
    in_flight = min(lay.pp, max(gas, 1))
    acts = per_layer * (m.num_layers / lay.pp) * in_flight * (wbytes / 2)
    logits = 4 * s * b * padded_vocab(vocab) / tp
    return MemoryEstimate(weights, grads, optim, acts, logits)


def step_time(cfg: RunConfig, vocab: int, lay: CandidateLayout, gpus: int, peak: float, mfu: float) -> float:
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    flops = training_flops_per_token(cfg.model, vocab, cfg.data.seq_length) * tokens
    if lay.recompute == "full":
        flops *= 4 / 3
    gas = cfg.train.global_batch_size // (lay.micro_batch * lay.dp)
    bubble = (lay.pp - 1) / (gas + lay.pp - 1) if lay.pp > 1 else 0.0
    return flops / (gpus * peak * mfu) / (1 - bubble) * overhead_factor(lay)


def overhead_factor(lay: CandidateLayout) -> float:
    """Assumed costs the FLOP count does not see (rules of thumb, each a few percent): TP all-reduces per
    doubling, ZeRO-2/3 gathers, small micro-batches' lower kernel efficiency, selective recompute."""
    import math

    f = 1 + 0.04 * math.log2(lay.tp)
    f *= {0: 1.0, 1: 1.0, 2: 1.02, 3: 1.08}[lay.zero]
    f *= {1: 1.08, 2: 1.03}.get(lay.micro_batch, 1.0)
    f *= 1.02 if lay.recompute == "selective" else 1.0
    return f


USABLE = 0.92  # share of a device's memory a run can use (allocator fragmentation, NCCL buffers)


def problems(cfg: RunConfig, lay: CandidateLayout, gpus: int, device_gib: float, est: MemoryEstimate) -> list[str]:
    m, out = cfg.model, []
    if lay.tp * lay.pp * lay.dp != gpus:
        out.append("tp x pp x dp != GPUs")
    if m.num_attention_heads % lay.tp or (m.num_query_groups or m.num_attention_heads) % lay.tp:
        out.append("heads not divisible by tp")
    if m.num_layers % lay.pp:
        out.append("layers not divisible by pp")
    if lay.pp > 1 and lay.zero > 1:
        out.append("ZeRO-2/3 with pipeline parallelism")
    if cfg.train.global_batch_size % (lay.micro_batch * lay.dp):
        out.append("global batch not divisible by micro-batch x dp")
    if est.total > device_gib * GIB * USABLE:
        out.append(f"needs {est.total / GIB:.1f} GiB of {device_gib:.0f} GiB ({USABLE:.0%} usable)")
    return out


@dataclass
class Plan:
    layout: CandidateLayout
    memory: MemoryEstimate
    step_s: float
    problems: list[str]


def plan_layout(cfg: RunConfig, vocab: int, lay: CandidateLayout, gpu: str, gpus: int, mfu: float) -> Plan:
    dev = load_devices()[gpu]
    peak = dev["bf16_flops"] if gpu != "cpu" else dev["fp32_flops_per_core"]
    bf16 = cfg.train.precision == "bf16" or gpu != "cpu"
    est = memory(cfg, vocab, lay, bf16=bf16)
    return Plan(
        lay,
        est,
        step_time(cfg, vocab, lay, gpus, peak, mfu),
        problems(cfg, lay, gpus, dev["memory_gib"], est),
    )


def search(cfg: RunConfig, vocab: int, gpu: str, gpus: int, mfu: float) -> tuple[list[Plan], dict[str, int]]:
    """Every layout that fits, fastest first, and how many were rejected for each reason."""
    fits, rejected = [], {}
    tps = [t for t in (1, 2, 4, 8) if gpus % t == 0]
    pps = [p for p in (1, 2, 4, 8, 16) if gpus % p == 0]
    for tp, pp, zero, mb, rc in itertools.product(tps, pps, (0, 1, 2, 3), (1, 2, 4, 8), ("none", "selective", "full")):
        if gpus % (tp * pp):
            continue
        lay = CandidateLayout(tp, pp, gpus // (tp * pp), zero, mb, rc, sequence_parallel=tp > 1)
        plan = plan_layout(cfg, vocab, lay, gpu, gpus, mfu)
        if plan.problems:
            for reason in plan.problems:
                key = reason.split(" of ")[0].split("needs")[0].strip() or "does not fit in memory"
                rejected[key] = rejected.get(key, 0) + 1
        else:
            fits.append(plan)
    fits.sort(key=lambda pl: (pl.step_s, pl.memory.total))
    return fits, rejected


@dataclass
class CheckpointIO:
    """A checkpoint's size and I/O on ``nodes`` nodes at ``node_gbps`` GB/s of storage bandwidth per node: every
    rank writes (and on resume reads) its 1/world share, so each node moves ``bytes / nodes``."""

    bytes: float
    nodes: int
    node_gbps: float
    writer_nodes_format1: int  # format 1: DP rank 0 of each TP x PP slice wrote it alone

    @property
    def per_node(self) -> float:
        return self.bytes / self.nodes

    @property
    def seconds(self) -> float:
        return self.per_node / (self.node_gbps * 1e9)

    @property
    def seconds_format1(self) -> float:
        return self.bytes / self.writer_nodes_format1 / (self.node_gbps * 1e9)


def checkpoint_io(cfg: RunConfig, vocab: int, tp: int, pp: int, gpus: int, node_gbps: float) -> CheckpointIO:
    """Checkpoint bytes (fp32 master plus the optimizer's fp32 states per parameter) and their spread over the
    nodes (``slurm.gpus_per_node``, 8 when unset)."""
    from training.checkpoint.canonical import OPTIMIZER_KEYS

    n = gpt_parameter_count(cfg.model, vocab, cfg.data.seq_length)
    per_node = cfg.slurm.gpus_per_node or 8
    nodes = max(1, math.ceil(gpus / per_node))
    writer_nodes = max(1, min(nodes, math.ceil(tp * pp / per_node)))  # format 1's writers: tp*pp ranks, packed
    return CheckpointIO(n * 4.0 * (1 + len(OPTIMIZER_KEYS[cfg.optim.name])), nodes, node_gbps, writer_nodes)


def summary(
    cfg: RunConfig,
    vocab: int,
    gpu: str,
    gpus: int,
    mfu: float,
    price: float | None,
    tokens: float | None,
    node_gbps: float = 2.0,
) -> tuple[str, Plan]:
    """The text ``shardforge plan`` prints for the config's own layout."""
    p, m = cfg.parallel, cfg.model
    dp = p.dp or max(1, gpus // (p.tp * p.pp))
    lay = CandidateLayout(
        p.tp, p.pp, dp, p.zero_stage, cfg.train.micro_batch_size, p.activation_checkpointing, p.sequence_parallel
    )
    plan = plan_layout(cfg, vocab, lay, gpu, gpus, mfu)
    n = gpt_parameter_count(m, vocab, cfg.data.seq_length)
    tokens = tokens or 20 * n
    steps = math.ceil(tokens / (cfg.train.global_batch_size * cfg.data.seq_length))  # whole steps reach the target
    hours = steps * plan.step_s / 3600
    e = plan.memory
    lines = [
        f"model: {n / 1e9:.2f}B parameters ({n:,}), {training_flops_per_token(m, vocab, cfg.data.seq_length):.3e} "
        f"training FLOPs/token",
        f"layout: tp={lay.tp} pp={lay.pp} dp={lay.dp} zero={lay.zero} micro_batch={lay.micro_batch} "
        f"recompute={lay.recompute} on {gpus} x {gpu}",
        f"memory per device: {e.total / GIB:.1f} GiB = weights {e.weights / GIB:.1f} + grads {e.gradients / GIB:.1f} "
        f"+ optimizer {e.optimizer / GIB:.1f} + activations {e.activations / GIB:.1f} + logits "
        f"{e.logits / GIB:.1f} + overhead {e.overhead / GIB:.1f}",
        f"step: {plan.step_s:.3f} s for {cfg.train.global_batch_size * cfg.data.seq_length:,} tokens at MFU {mfu:.0%}",
        f"target: {tokens:.3e} tokens ({tokens / n:.0f} per parameter) = {steps:,.0f} steps, {hours:,.1f} h, "
        f"{hours * gpus:,.0f} GPU-hours" + (f", ${hours * gpus * price:,.0f}" if price else ""),
        _checkpoint_line(checkpoint_io(cfg, vocab, lay.tp, lay.pp, gpus, node_gbps)),
        "fits" if not plan.problems else "DOES NOT FIT: " + "; ".join(plan.problems),
    ]
    return "\n".join(lines), plan


def _checkpoint_line(io: CheckpointIO) -> str:
    return (
        f"checkpoint: {io.bytes / 1e9:,.1f} GB (fp32 masters + optimizer states), {io.per_node / 1e9:,.1f} GB per "
        f"node on {io.nodes} nodes: save or load ~{io.seconds:,.1f} s at {io.node_gbps:g} GB/s per node (one writer "
        f"per TP x PP slice would need ~{io.seconds_format1:,.0f} s)"
    )
