"""The parallel layout as an explicit object: sizes, this rank's coordinates and its process groups.

``init_distributed`` starts ``torch.distributed`` from the launcher's environment (torchrun's ``RANK`` /
``WORLD_SIZE`` or Slurm's ``SLURM_PROCID`` / ``SLURM_NTASKS``, or a single process with neither), builds
megatron-core's model-parallel groups for the configured TP and PP, and returns a :class:`Layout` that is
passed to whoever needs a group. Nothing reads the layout from a global.
"""

from __future__ import annotations

import datetime
import os
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.config import ParallelConfig
from core.errors import ConfigError
from core.net import free_port


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    rank: int
    world: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: object
    pp_group: object
    dp_group: object
    mp_group: object  # tensor x pipeline: the ranks that hold one copy of the model
    stage_group: object  # tensor x data: the ranks of one pipeline stage

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def describe(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage} world={self.world}"


def env_from_launcher() -> None:
    """Fill torch.distributed's variables from Slurm's when running under srun, or for a single process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def process_group_backend(cuda_available: bool | None = None) -> str:
    """The default process group's backend: gloo on CPU; on GPU NCCL for CUDA tensors *and* gloo for CPU tensors.

    A bare ``"nccl"`` maps only the ``cuda`` device type, so any collective on a CPU tensor (a flag, an object
    broadcast, a checkpoint bookkeeping value) would raise "No backend type associated with device type cpu".
    Groups created later without a backend (megatron-core's TP, PP and DP groups) inherit this map."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return "cpu:gloo,cuda:nccl" if cuda_available else "gloo"


def init_distributed(cfg: ParallelConfig, timeout_s: float = 600.0) -> Layout:
    """Start the process group and megatron's parallel state for ``cfg``; return the Layout."""
    from parallelism import cpu_shim

    cpu_shim.skip_megatron_jit()
    cpu_shim.apply()
    env_from_launcher()
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.nproc:
        raise ConfigError(
            f"parallel.nproc={cfg.nproc} but the launcher started {world} ranks",
            fix=f"set parallel.nproc={world} or start {cfg.nproc} ranks",
        )
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        device_id = None
        if cuda:
            device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device_id)
        dist.init_process_group(
            process_group_backend(cuda), timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id
        )
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=cfg.tp, pipeline_model_parallel_size=cfg.pp)
    return Layout(
        tp=cfg.tp,
        pp=cfg.pp,
        dp=ps.get_data_parallel_world_size(),
        zero_stage=cfg.zero_stage,
        rank=dist.get_rank(),
        world=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        stage_group=ps.get_tensor_and_data_parallel_group(),
    )


def seed_all(seed: int) -> None:
    """Seed torch and megatron's tensor-parallel RNG tracker (mandatory before a megatron model runs)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Tear down megatron's state and the process group (avoids gloo's abort at interpreter exit)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def deepspeed_mpu(layout: Layout) -> types.SimpleNamespace:
    """DeepSpeed's ``mpu`` protocol for ``layout``: 'model parallel' is TP x PP (for norms and overflow)."""
    m = types.SimpleNamespace()
    m.get_model_parallel_rank = lambda: dist.get_rank(layout.mp_group)
    m.get_model_parallel_world_size = lambda: layout.tp * layout.pp
    m.get_model_parallel_group = lambda: layout.mp_group
    m.get_tensor_model_parallel_rank = lambda: layout.tp_rank
    m.get_tensor_model_parallel_world_size = lambda: layout.tp
    m.get_tensor_model_parallel_group = lambda: layout.tp_group
    m.get_slice_parallel_rank = lambda: layout.tp_rank
    m.get_slice_parallel_world_size = lambda: layout.tp
    m.get_slice_parallel_group = lambda: layout.tp_group
    m.get_data_parallel_rank = lambda: layout.dp_rank
    m.get_data_parallel_world_size = lambda: layout.dp
    m.get_data_parallel_group = lambda: layout.dp_group
    m.get_pipeline_model_parallel_rank = lambda: layout.pp_rank
    m.get_pipeline_model_parallel_world_size = lambda: layout.pp
    m.get_pipeline_model_parallel_group = lambda: layout.pp_group
    m.get_pipe_parallel_rank = lambda: layout.pp_rank
    m.get_pipe_parallel_world_size = lambda: layout.pp
    m.get_pipe_parallel_group = lambda: layout.pp_group
    from megatron.core import parallel_state as ps

    m.get_tensor_model_parallel_src_rank = ps.get_tensor_model_parallel_src_rank
    return m
