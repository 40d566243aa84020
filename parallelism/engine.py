"""Wrap a model's layer list in DeepSpeed for a layout: the plain engine for PP = 1, the pipeline engine for PP > 1.

Both are built from the same ``(class, args)`` layer list, so parameter names (``"<layer>.<path>"``) agree and a
checkpoint of one converts to the other. Why this route (see docs/parallelism.md): DeepSpeed's pipeline engine
over megatron-core layers matched a 1-rank run to 1e-7 with TP x PP x ZeRO-1 and reshards with its universal
checkpoints; the plain engine adds ZeRO-2/3, which the pipeline engine refuses.

The :class:`Engine` interface the trainer uses: ``train_step(micro_batches) -> loss`` (mean over the global batch),
``eval_loss(micro_batches)``, ``grad_norm()``, ``lr()``, ``module``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from core.config import RunConfig
from core.prompt_tokens import has_prompt_tokens, model_tokens
from parallelism.layout import Layout, deepspeed_mpu


@dataclass
class ModelParts:
    """What the engine needs to know of a model."""

    specs: list[tuple[type, tuple]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    build_sequential: Callable[[], nn.Module]
    init_weights: Callable[[nn.Module, Layout], None]
    pipeline_partition: str = "type:DecoderLayer"


def deepspeed_config(cfg: RunConfig, dp: int) -> dict:
    t, o = cfg.train, cfg.optim
    gas = t.global_batch_size // (t.micro_batch_size * dp)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": o.clip_grad,
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "reduce_bucket_size": 5e7,
            "allgather_bucket_size": 5e7,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if cfg.parallel.sequence_parallel:
        # DeepSpeed's pipeline sends 1/tp of an activation per TP rank and all-gathers it, assuming the TP ranks
        # hold the same activation; with sequence parallelism each holds its own slice.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    return ds


def _quiet_deepspeed() -> None:
    import deepspeed

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 40 s g++ build on CPU


def install_clip_norm():
    """Replace DeepSpeed 0.19.8's ZeRO-0 fp32 clip (runtime/utils.clip_grad_norm_, called by its engine) with the
    same arithmetic, bitwise, and three changes: a replicated parameter counts on TP rank 0 of every pipeline stage
    (DeepSpeed keeps it on rank 0 of the whole TP x PP group, dropping later stages' norms from the global norm;
    ZeRO-1/2 already count it per stage); one foreach call per operation instead of a Python loop over parameters
    (with a group lookup per parameter); no collective over a group of one rank. The last global norm, a device
    tensor, stays in the function's ``last`` (read once per step: DeepSpeed drops it). ``all_reduce`` lets a caller
    time the norm's collectives as waits."""
    import deepspeed.runtime.engine as ds_engine

    if getattr(ds_engine.clip_grad_norm_, "_shardforge", False):
        return ds_engine.clip_grad_norm_
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    original = ds_engine.clip_grad_norm_

    def clip(parameters, max_norm, norm_type=2, mpu=None, all_reduce=dist.all_reduce):
        params = [p for p in parameters if p.grad is not None]
        if float(norm_type) != 2.0 or mpu is None or not params:
            clip.last = original(params, max_norm, norm_type, mpu)
            return clip.last
        first = bwc_tensor_model_parallel_rank(mpu) == 0
        counted = [p.grad.detach().float() for p in params if first or is_model_parallel_parameter(p)]
        device = params[0].device
        if counted:
            total = torch.stack(torch._foreach_norm(counted, 2.0)).pow(2.0).sum().float()
        else:
            total = torch.zeros((), device=device)
        if mpu.get_model_parallel_world_size() > 1:
            all_reduce(total, op=dist.ReduceOp.SUM, group=mpu.get_model_parallel_group())
        total = total.pow(1.0 / 2.0)
        dp_group = mpu.get_data_parallel_group()
        if dist.get_world_size(dp_group) > 1:  # an average of equal norms (DeepSpeed's, for MoE parameters)
            total = total * 1.0 / float(dist.get_world_size(dp_group))
            all_reduce(total, group=dp_group)
        total = total.to(device)
        coef = (torch.full_like(total, float(max_norm)) / (total + 1e-6)).clamp(max=1.0)  # filled there: no copy in
        torch._foreach_mul_([p.grad for p in params], coef)
        clip.last = total
        return total

    clip._shardforge, clip.last = True, None
    ds_engine.clip_grad_norm_ = clip
    return clip


def sum_sequence_parallel_grads(model: nn.Module, layout: Layout) -> int:
    """With sequence parallelism each TP rank computes norm-weight gradients from its slice of the sequence: sum
    them over the TP group as they are produced (a tensor hook runs before DeepSpeed's own reduction hooks)."""
    if layout.tp == 1:
        return 0
    n = 0
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):

            def hook(grad, group=layout.tp_group):
                grad = grad.clone()
                dist.all_reduce(grad, group=group)
                return grad

            p.register_hook(hook)
            n += 1
    return n


class WaitClock:
    """Seconds a rank spends in its own collectives, summed until taken: a rank that the others wait for waits
    least, so step time less these waits (and the data wait) shows which rank is slow. On CPU gloo blocks the
    caller: the host clock. On a GPU, NCCL returns at once and the stream waits: CUDA events recorded before and
    after the call, read when taken, after the step's loss was read (so they are complete: no extra sync)."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed(self, fn: Callable, *args, **kwargs):
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._events.append((start, end))
            return out
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._host_s += time.perf_counter() - t0

    def take(self) -> float:
        seconds = self._host_s
        for start, end in self._events:
            end.synchronize()
            seconds += start.elapsed_time(end) / 1000
        self._host_s, self._events = 0.0, []
        return seconds


class Engine:
    """The trainer's view of a DeepSpeed engine."""

    def __init__(self, ds_engine, layout: Layout, loss_fn):
        self.ds, self.layout, self.loss_fn = ds_engine, layout, loss_fn
        self.waits = WaitClock(layout.device)
        if layout.dp > 1:  # DeepSpeed's gradient reduction, where it calls it (ZeRO-0/1 all of it, ZeRO-2/3 the rest)
            reduce = ds_engine.allreduce_gradients
            ds_engine.allreduce_gradients = lambda *a, **k: self.waits.timed(reduce, *a, **k)

    def _all_reduce(self, tensor: torch.Tensor, group=None, op=dist.ReduceOp.SUM) -> None:
        self.waits.timed(dist.all_reduce, tensor, op=op, group=group)

    def take_sync_wait(self) -> float:
        """Seconds this rank waited in the step's collectives since the last call (read once per step)."""
        return self.waits.take()

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def grad_norm(self) -> float | None:
        g = self.ds.get_global_grad_norm()
        return None if g is None else float(g)

    def _dp_mean(self, value: torch.Tensor) -> float:
        """Mean of a device scalar over the data-parallel ranks, read once."""
        if self.layout.dp > 1:
            self._all_reduce(value, group=self.layout.dp_group)
            value = value / self.layout.dp
        return float(value)


class PlainEngine(Engine):
    """PP = 1: forward, ``engine.backward`` and ``engine.step`` per micro-batch (DeepSpeed accumulates; in fp32
    ZeRO-0 the module and the backward are called directly, see ``_backward``)."""

    def __init__(self, ds_engine, layout: Layout, loss_fn):
        super().__init__(ds_engine, layout, loss_fn)
        self._ok: torch.Tensor | None = None  # on the device: every micro-batch so far was finite on every rank
        self._on_cpu = layout.device.type == "cpu"  # where reading the flag on the host costs nothing
        self._hooks: list = []  # the masking hooks: always on a GPU, on the CPU from a non-finite loss to the step end
        self._norm: torch.Tensor | None = None  # ZeRO-0's global gradient norm of the last step, on the device
        clips = layout.zero_stage == 0 and self.ds.gradient_clipping() > 0
        if layout.zero_stage == 0 and layout.dp == 1:
            self.ds.enable_backward_allreduce = False  # averaging over one rank: a flatten, copy and unflatten
        self._clip = install_clip_norm() if clips else None
        self._direct = layout.zero_stage == 0 and not (self.ds.bfloat16_enabled() or self.ds.fp16_enabled())
        if self._direct:
            clip = self._clip and functools.partial(self._clip, all_reduce=self._all_reduce)  # its waits timed
            fixed = FixedParams(self.ds, clip)  # where DeepSpeed calls them
            self.ds.zero_grad, self.ds.clip_fp32_gradients = fixed.zero_grad, fixed.clip_fp32_gradients
        if layout.zero_stage < 3 and not self._on_cpu:
            self._mask_gradients()

    def _mask_gradients(self) -> None:
        """Register the hook that zeroes each gradient once any rank's loss in this step was not finite: a tensor
        hook, which runs before DeepSpeed's accumulation hooks. On a GPU for the whole run (it masks on the device
        flag: no host synchronization); on the CPU, where reading the flag costs nothing, only from the micro-batch
        whose loss was not finite to the end of that step (a Python call per gradient otherwise)."""
        if not self._hooks:
            params = (p for p in self.ds.module.parameters() if p.requires_grad)
            self._hooks = [p.register_hook(self._mask_grad) for p in params]

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self._ok is None:  # a backward outside a training step
            return grad
        return torch.where(self._ok, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))

    def _forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split on the host (the prompt-token check reads host memory, no device sync), then move."""
        inputs, labels = inputs_and_labels(tokens)
        device = self.layout.device
        model = self.ds.module if self._direct else self.ds
        return model(inputs.to(device, non_blocking=True)), labels.to(device, non_blocking=True)

    def _backward(self, loss: torch.Tensor) -> None:
        """``engine.backward``. In fp32 ZeRO-0 (``_direct``) what it computes there, without its per-call hooks,
        timers and graph tracking (with the module called directly, ~0.4 ms a step of host time on small models):
        the loss divided by the accumulation steps, backward, and DeepSpeed's own gradient all-reduce (which acts at
        the accumulation boundary). DeepSpeed's ``step`` still clips, steps, schedules and counts."""
        if not self._direct:
            self.ds.backward(loss)
            return
        (loss / self.ds.gradient_accumulation_steps()).backward()
        if self.ds.enable_backward_allreduce:
            self.ds.allreduce_gradients()

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        """One optimizer step. A micro-batch whose loss is not finite on any rank turns the whole step into a
        skipped one: its gradients and those of later micro-batches are zeroed as they are produced, and the step
        runs with lr 0, so the weights are unchanged (AdamW's moments still absorb the finite micro-batches'
        gradients). The finiteness flag lives on the device; the host reads it once per step. Returns NaN for a
        skipped step. Under ZeRO-3 (partitioned parameters) and with PP > 1 the step is applied and only counted."""
        if not self.ds.module.training:  # module.train() walks every submodule: only after an evaluation
            self.ds.train()
        device, guard = self.layout.device, self.layout.zero_stage < 3
        total = torch.zeros((), device=device)
        skipped = False
        self._ok = torch.ones((), dtype=torch.bool, device=device) if guard else None
        try:
            for i, tokens in enumerate(micro_batches):
                loss = self.loss_fn(*self._forward(tokens))
                if guard:
                    self._ok = self._ok & self._finite_everywhere(loss)
                    if self._on_cpu and not bool(self._ok):  # one read a micro-batch, on the CPU
                        self._mask_gradients()
                self._backward(loss)
                if i == len(micro_batches) - 1:
                    skipped = guard and not bool(self._ok)  # the step's one host read of the flag
                    if self.layout.zero_stage == 0 and self._clip is None:
                        self._norm = self._replicated_grad_norm()  # ZeRO-0 without clipping computes none
                    if skipped:
                        self._set_lr(0.0)
                self.ds.step()
                if self._clip is not None and i == len(micro_batches) - 1:
                    self._norm = self._clip.last  # the norm DeepSpeed's clip computed in this step
                total += loss.detach().float()
        finally:
            self._ok = None
            if self._on_cpu:
                for hook in self._hooks:
                    hook.remove()
                self._hooks = []
        return float("nan") if skipped else self._dp_mean(total / len(micro_batches))

    def _finite_everywhere(self, loss: torch.Tensor) -> torch.Tensor:
        """A device bool: this micro-batch's loss is finite on every rank (MIN over the world, on the device)."""
        flag = torch.isfinite(loss.detach()).all().to(torch.int32)
        if self.layout.world > 1:
            self._all_reduce(flag, group=None, op=dist.ReduceOp.MIN)  # the default group: every rank
        return flag.bool()

    def _set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr  # the schedule sets the next step's rate again after this step

    def _replicated_grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the (already data-parallel-reduced) gradients: TP shards summed over the TP group,
        TP-replicated parameters counted once (a device scalar)."""
        split = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        for p in self.ds.module.parameters():
            if p.grad is None:
                continue
            sq = p.grad.detach().double().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                split += sq
            else:
                replicated += sq
        if self.layout.tp > 1:
            dist.all_reduce(split, group=self.layout.tp_group)
        return (split + replicated).sqrt()

    def grad_norm(self) -> float | None:
        g = self.ds.get_global_grad_norm()
        if g is None:
            g = self._norm
        return None if g is None else float(g)

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor]) -> float:
        self.ds.eval()
        total = torch.zeros((), device=self.layout.device)
        for tokens in micro_batches:
            total += self.loss_fn(*self._forward(tokens)).float()
        return self._dp_mean(total / len(micro_batches))


class FixedParams:
    """DeepSpeed's fp32 ZeRO-0 ``zero_grad`` (every gradient set to None) and ``clip_fp32_gradients`` over a list of
    the parameters made once: DeepSpeed walks ``module.parameters()`` for each, on every step."""

    def __init__(self, ds_engine, clip):
        self.ds, self.clip = ds_engine, clip
        self.params = list(ds_engine.module.parameters())

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def clip_fp32_gradients(self) -> None:
        self.clip(self.params, max_norm=self.ds.gradient_clipping(), mpu=self.ds.mpu)


def inputs_and_labels(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (B, S+1) -> inputs (B, S) and labels (B, S). Supervised fine-tuning data stores prompt tokens
    negative (``core.prompt_tokens``): the model reads their ids, and the loss skips them."""
    if has_prompt_tokens(tokens):
        return model_tokens(tokens)[:, :-1], tokens[:, 1:]
    return tokens[:, :-1], tokens[:, 1:]


class PipeEngine(Engine):
    """PP > 1: DeepSpeed's pipeline engine runs the 1F1B schedule over the micro-batches."""

    @staticmethod
    def _pairs(micro_batches):
        return iter([inputs_and_labels(t) for t in micro_batches])

    def train_step(self, micro_batches: list[torch.Tensor]) -> float:
        return float(self.ds.train_batch(data_iter=self._pairs(micro_batches)))

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[torch.Tensor]) -> float:
        loss = self.ds.eval_batch(self._pairs(micro_batches), num_micro_batches=len(micro_batches))
        return float(loss)


def build_engine(parts: ModelParts, layout: Layout, cfg: RunConfig, build_optimizer, build_schedule) -> Engine:
    """Build the model for ``layout``, initialize its weights, and wrap it in DeepSpeed."""
    import deepspeed

    _quiet_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    ds_cfg = deepspeed_config(cfg, layout.dp)
    if layout.pp == 1:
        model = parts.build_sequential()
        parts.init_weights(model, layout)
        sum_sequence_parallel_grads(model, layout)
        model.to(layout.device)
        optimizer = build_optimizer(model)
        ds, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=build_schedule, config=ds_cfg, mpu=deepspeed_mpu(layout)
        )
        return PlainEngine(ds, layout, parts.loss_fn)
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if layout.zero_stage == 0:
        install_clip_norm()
    topo = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    model = PipelineModule(
        layers=[LayerSpec(cls, *args) for cls, args in parts.specs],
        loss_fn=parts.loss_fn,
        topology=topo,
        partition_method=parts.pipeline_partition,
        activation_checkpoint_interval=0,
    )
    grid = model._grid
    assert (grid.get_stage_id(), grid.get_data_parallel_id()) == (layout.pp_rank, layout.dp_rank), "rank layouts differ"
    parts.init_weights(model, layout)
    sum_sequence_parallel_grads(model, layout)
    model.to(layout.device)
    optimizer = build_optimizer(model)
    ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_schedule, config=ds_cfg)
    return PipeEngine(ds, layout, parts.loss_fn)
