"""What megatron-core needs to run without CUDA: the one place that patches torch for CPU-only machines.

megatron-core asks ``torch.cuda`` for the current device, synchronizes, and keeps a CUDA RNG for its
tensor-parallel RNG tracker. On a machine without a GPU these are redirected to the CPU (device ``"cpu"``,
no-op synchronize, the CPU generator). ``apply()`` does nothing when CUDA is available, and is idempotent.
"""

from __future__ import annotations

import sys
import types

import torch

_applied = False


def skip_megatron_jit() -> None:
    """Register a stand-in ``megatron.core.jit`` whose ``jit_fuser`` is a no-op, before megatron is imported.

    megatron-core wraps its fused kernels (bias-GeLU/SwiGLU, bias-dropout, ...) in ``torch.compile`` when its
    modules are imported, which pulls in torch._inductor: about 3 s of CPU in every rank. Shardforge turns those
    fusions off (``training.model.gpt.transformer_config``), so the wrapped functions never run. Does nothing once
    megatron is imported."""
    if "megatron.core" in sys.modules or "megatron.core.jit" in sys.modules:
        return

    def noop(func=None, *args, **kwargs):
        return func

    stub = types.ModuleType("megatron.core.jit")
    stub.jit_fuser = stub.noop_decorator = noop
    stub.enable_jit_fuser = stub.disable_jit_fuser = lambda: None
    sys.modules["megatron.core.jit"] = stub


def apply() -> bool:
    """Patch torch.cuda and megatron's RNG helpers for CPU use; return True if the shim is active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.manual_seed = torch.manual_seed  # megatron seeds its RNG tracker through this
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _applied = True
    return True
