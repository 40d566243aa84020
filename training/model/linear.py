"""megatron-core's tensor-parallel linear layers, computed by torch's native linear when the layer has no
tensor-parallel partner.

With one TP rank, ``ColumnParallelLinear`` and ``RowParallelLinear`` run a Python ``autograd.Function``
(``LinearWithGradAccumulationAndAsyncCommunication``, forward and backward in Python) between two identity
region functions; on a small model that Python is ~3% of a CPU step. These subclasses keep everything else of
megatron's layers (parameters, names, initialization, sharded state, LoRA targets) and, when nothing is split or
communicated, compute ``F.linear(x, W)`` and add the bias afterwards, as megatron does (same forward arithmetic;
the weight gradient comes from torch's own backward). With more than one TP rank, sequence parallelism or
megatron's gradient-accumulation fusion they are megatron's layers unchanged.
"""

from __future__ import annotations

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size
from torch.nn import functional as F


def runs_alone(layer) -> bool:
    """True when ``layer`` (a megatron parallel linear) needs none of megatron's communication or fusion."""
    config = layer.config
    return (
        get_pg_size(layer.tp_group) == 1
        and not layer.explicit_expert_comm
        and not config.sequence_parallel
        and not config.gradient_accumulation_fusion
        and not config.defer_embedding_wgrad_compute
        and not config.cpu_offloading
    )


def _with_bias(module, out):
    if module.bias is None:
        return out, None
    if module.skip_bias_add:
        return out, module.bias
    return out + module.bias, None


class ColumnLinear(ColumnParallelLinear):
    """``ColumnParallelLinear``; native at one TP rank (``weight`` may be passed, as for tied output heads)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.native = runs_alone(self)

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.native:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        return _with_bias(self, F.linear(input_, self.weight if weight is None else weight))


class RowLinear(RowParallelLinear):
    """``RowParallelLinear``; native at one TP rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.native = runs_alone(self)

    def forward(self, input_):
        if not self.native:
            return super().forward(input_)
        return _with_bias(self, F.linear(input_, self.weight))
