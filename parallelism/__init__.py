"""Process groups and the parallel layout (TP, PP, DP, ZeRO) as an explicit object, the CPU shim, the DeepSpeed
engine wrapper and the tensor-parallel split rules. May import: core only."""
