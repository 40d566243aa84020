"""The canonical, layout-independent model and optimizer state: its keys, how each parameter's fp32 master and
optimizer states are read from and set into a DeepSpeed engine, and the reader of format-1 checkpoints.

Format 2 (``training.checkpoint.shards``) spreads these keys over every rank. In format 1 (still loaded), each
(TP rank, PP stage) wrote one safetensors file holding, for every parameter it owns (global names such as
``"3.layer.mlp.linear_fc1.weight"``), the fp32 master weight of its TP slice (complete over data-parallel ranks,
whatever the ZeRO stage) and the optimizer's per-parameter states (``exp_avg``, ``exp_avg_sq``, ...). Loading
reassembles each full tensor from the old TP slices and cuts it for the new layout (``parallelism.tp_plan``), so
a checkpoint resumes on any TP, PP, DP or ZeRO stage, optimizer state included. Nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from core.errors import IntegrityError
from parallelism.tp_plan import shard, unshard

OPTIMIZER_KEYS = {
    "adamw": ("exp_avg", "exp_avg_sq"),
    "adam": ("exp_avg", "exp_avg_sq"),
    "sgd": ("momentum_buffer",),
    "rmsprop": ("square_avg", "momentum_buffer"),
}


def _zero_managed(p: torch.nn.Parameter) -> bool:
    """ZeRO 1-3 own this parameter's fp32 master (a rank without a fragment of it has ``_hp_mapping = None`` but
    must still join the collective gathers)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _base_optimizer(ds_engine):
    opt = ds_engine.optimizer
    return getattr(opt, "optimizer", opt)


def full_value(p, ds_engine, key: str | None) -> torch.Tensor | None:
    """Full-over-DP fp32 value of parameter ``p`` (key None) or of one of its optimizer states (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _zero_managed(p):
        return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if key is None:
        return p.detach().float()
    state = _base_optimizer(ds_engine).state.get(p, {})
    return state[key].detach().float() if key in state else None


def local_piece(p, ds_engine, key: str | None, dp: int, dp_rank: int) -> tuple[int, torch.Tensor] | None:
    """The elements of ``p``'s fp32 master (key None) or optimizer state that this DP rank holds, without any
    communication: ``(first element, flat values)``, or None when it holds none. Under ZeRO-1/2 its fragment of
    the flat partition, under ZeRO-3 its partition of the parameter, else (replicated over DP) the ``dp_rank``-th
    of ``dp`` equal pieces."""
    if hasattr(p, "ds_id"):  # ZeRO-3: rank r holds elements [r * part, (r + 1) * part), the last one padded
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
        group = getattr(p, "ds_process_group", None)
        rank = dist.get_rank(group) if group is not None else dp_rank
        part = local.numel()
        lo = rank * part
        hi = min(p.ds_numel, lo + part)
        return (lo, local.reshape(-1)[: hi - lo]) if hi > lo else None
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2: this rank's fragment of the parameter, or none
        mapping = p._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.get_hp_fragment(key).reshape(-1)
    value = full_value(p, ds_engine, key)
    if value is None:
        return None
    n = value.numel()
    lo, hi = n * dp_rank // dp, n * (dp_rank + 1) // dp
    return lo, value.reshape(-1)[lo:hi]


def set_value(p, ds_engine, key: str | None, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(p.device)
    if _zero_managed(p):
        if key is None:
            safe_set_full_fp32_param(p, value)
            if not hasattr(p, "ds_id"):
                p.data.copy_(value.to(p.dtype))
        else:
            safe_set_full_optimizer_state(p, value, key)
        return
    if key is None:
        p.data.copy_(value.to(p.dtype))
    else:
        _base_optimizer(ds_engine).state.setdefault(p, {})[key] = value.clone()


def step_tensor(group: dict, p: torch.Tensor, step: int) -> torch.Tensor:
    """An optimizer's ``step`` state where torch keeps it: on the parameter's device for fused (and capturable)
    optimizers, whose kernels read it there, on the host otherwise."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")


def prepare_optimizer_states(ds_engine, optimizer_name: str) -> None:
    """Make every optimizer state exist and be linked to its parameters before gathering or setting them.

    torch optimizers create states lazily at their first step, and DeepSpeed 0.19.8's ZeRO-1/2 links parameter
    fragments to states once, right after the *first* param group steps, so later groups (our no-decay group)
    stay unlinked. Create missing states (zeros, step 0) and link again."""
    opt = _base_optimizer(ds_engine)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if not state:
                state["step"] = step_tensor(group, p, 0)
                for key in OPTIMIZER_KEYS[optimizer_name]:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    zero_opt = ds_engine.optimizer
    if hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()


def optimizer_step_count(ds_engine) -> int:
    for state in _base_optimizer(ds_engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step_count(ds_engine, step: int) -> None:
    opt = _base_optimizer(ds_engine)
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.setdefault(p, {})
            if state or step:
                state["step"] = step_tensor(group, p, step)


class CanonicalReader:
    """Index of the canonical files of a checkpoint: which file holds each (kind, name) for each old TP rank."""

    def __init__(self, model_dir: Path, old_tp: int):
        self.files: dict[str, dict[int, Path]] = {}
        self.old_tp = old_tp
        for f in sorted(model_dir.glob("tp*_pp*.safetensors")):
            tp_rank = int(f.name[2:].split("_")[0])
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    self.files.setdefault(key, {})[tp_rank] = f

    def full(self, key: str, gated: bool) -> torch.Tensor | None:
        parts_at = self.files.get(key)
        if parts_at is None:
            return None
        if len(parts_at) != self.old_tp and len(parts_at) != 1:
            raise IntegrityError(f"checkpoint holds {len(parts_at)} of {self.old_tp} TP slices of '{key}'")
        parts = []
        for rank in sorted(parts_at):
            with safe_open(str(parts_at[rank]), framework="pt") as st:
                parts.append(st.get_tensor(key))
        name = key.split("/", 1)[1]
        return unshard(name, parts, gated) if len(parts) > 1 else parts[0]


def load_canonical(ds_engine, reader: CanonicalReader, optimizer_name: str, tp: int, tp_rank: int, gated: bool) -> None:
    """Set every parameter and optimizer state of this rank from the canonical files (collective under ZeRO)."""
    prepare_optimizer_states(ds_engine, optimizer_name)
    missing, mismatched = [], []
    for name, p in ds_engine.module.named_parameters():
        for key in (None, *OPTIMIZER_KEYS[optimizer_name]):
            full = reader.full(f"{key or 'param'}/{name}", gated)
            if full is None:
                if key is None:
                    missing.append(name)
                continue
            local = shard(name, full, tp, tp_rank, gated)
            expected = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(local.shape) != expected:
                mismatched.append(f"{name} {tuple(local.shape)} vs model {expected}")
                continue
            set_value(p, ds_engine, key, local)
    if missing or mismatched:
        what = "; ".join([f"missing {n}" for n in missing[:3]] + mismatched[:3])
        raise IntegrityError(
            f"checkpoint does not fit this model: {what}",
            fix="resume with the model config the checkpoint was saved with",
        )
