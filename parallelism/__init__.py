"""Process groups and the parallel layout (TP, PP, DP, ZeRO) as an explicit object (see README)."""
