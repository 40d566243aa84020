"""What megatron-core needs to run without CUDA: the one place that patches torch for CPU-only machines.

megatron-core asks ``torch.cuda`` for the current device, synchronizes, and keeps a CUDA RNG for its
tensor-parallel RNG tracker. On a machine without a GPU these are redirected to the CPU (device ``"cpu"``,
no-op synchronize, the CPU generator). ``apply()`` does nothing when CUDA is available, and is idempotent.
"""

from __future__ import annotations

import torch

_applied = False


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
