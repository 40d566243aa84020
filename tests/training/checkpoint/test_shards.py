"""Format 2's files on their own (no ranks): shares written by every (TP, DP) rank, the read plan, verified
range reads, and the full tensors put back together on another layout."""

from __future__ import annotations

import json

import pytest
import torch

from core.errors import IntegrityError
from parallelism.tp_plan import shard
from training.checkpoint import shards

GATED = True
FULL = {  # a column-parallel stacked matrix, a row-parallel one, and a replicated vector (sizes not multiples)
    "param/0.layer.mlp.linear_fc1.weight": torch.arange(12 * 5, dtype=torch.float32).reshape(12, 5),
    "param/0.layer.mlp.linear_fc2.weight": -torch.arange(6 * 14, dtype=torch.float32).reshape(6, 14) / 7,
    "exp_avg/0.layer.input_layernorm.weight": torch.linspace(0, 1, 11),
}


def write_layout(folder, tp: int, dp: int) -> dict:
    """What ranks (t, d) of a TP x DP layout write; returns the manifest's file entries."""
    (folder / "model").mkdir(parents=True)
    entries = {}
    for t in range(tp):
        for d in range(dp):
            tensors, shares = {}, {}
            for key, full in FULL.items():
                local = shard(key.split("/", 1)[1], full, tp, t, GATED).reshape(-1)
                lo, hi = shards.share_bounds(local.numel(), dp, d)
                tensors[key], shares[key] = (
                    local[lo:hi].clone(),
                    [list(shard(key.split("/", 1)[1], full, tp, t, GATED).shape), lo, hi],
                )
            entries |= shards.write_share(folder / "model", shards.file_name(t, 0, d), tensors, shares, {})
    return entries


def test_a_tp2_dp3_checkpoint_reads_back_whole_and_the_reads_split_evenly(tmp_path):
    entries = write_layout(tmp_path, tp=2, dp=3)
    sizes = [entries[f"model/tp{t}_pp0_dp{d}.safetensors"]["bytes"] for t in range(2) for d in range(3)]
    assert len(sizes) == 6 and max(sizes) - min(sizes) < 64  # every rank wrote a sixth (headers aside)
    index = shards.build_index(tmp_path / "model", old_tp=2)
    reader = shards.ChunkReader(tmp_path, entries)
    for key, full in FULL.items():  # one process (consolidate, export): the full tensors, exactly
        n = full.numel() if "layernorm" in key else 2 * (full.numel() // 2)
        data = shards.read_elements(reader, index, key, 0, n, GATED)
        assert torch.equal(shards.assemble(index, key, data, GATED), full)
    keys = list(FULL)
    for parts in (1, 4, 6):  # the ranks of a stage: every element of every key read exactly once, evenly
        plan = shards.plan_reads(index, keys, GATED, parts)
        assert len(plan) == parts
        per_part = [sum(b - a for _, a, b in ranges) for ranges in plan]
        total = 12 * 5 + 6 * 14 + 11
        assert sum(per_part) == total and max(per_part) - min(per_part) <= 0.05 * total / parts + 14
        for key in keys:
            covered = sorted((a, b) for ranges in plan for k, a, b in ranges if k == key)
            n = {keys[0]: 60, keys[1]: 84, keys[2]: 11}[key]
            assert (
                covered[0][0] == 0 and covered[-1][1] == n and all(x[1] == y[0] for x, y in zip(covered, covered[1:]))
            )


def test_on_the_same_layout_each_rank_reads_only_the_file_it_wrote(tmp_path):
    entries = write_layout(tmp_path, tp=2, dp=3)
    index = shards.build_index(tmp_path / "model", old_tp=2)
    plan = shards.plan_reads(index, list(FULL), GATED, 6)
    for j, ranges in enumerate(plan):  # stage-group rank j = tp_rank + 2 * dp_rank
        reader = shards.ChunkReader(tmp_path, entries)
        for key, a, b in ranges:
            shards.read_elements(reader, index, key, a, b, GATED)
        name = shards.file_name(j % 2, 0, j // 2)
        assert set(reader.sums) == {tmp_path / "model" / name}
        sums = entries[f"model/{shards.sums_name(name)}"]["bytes"]
        assert reader.bytes_read == entries[f"model/{name}"]["bytes"] + sums


def test_a_flipped_byte_is_found_by_the_reader_and_names_the_file(tmp_path):
    entries = write_layout(tmp_path, tp=1, dp=2)
    path = tmp_path / "model" / "tp0_pp0_dp1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    index = shards.build_index(tmp_path / "model", old_tp=1)
    reader = shards.ChunkReader(tmp_path, entries)
    key = "exp_avg/0.layer.input_layernorm.weight"
    assert shards.read_elements(reader, index, key, 0, 5, GATED).tolist() == FULL[key][:5].tolist()  # other file
    with pytest.raises(IntegrityError, match=r"tp0_pp0_dp1\.safetensors: bytes 0\.\.\d+ do not match their sha256"):
        shards.read_elements(reader, index, key, 5, 11, GATED)
    sums = tmp_path / "model" / "tp0_pp0_dp0.sums.json"
    sums.write_text(json.dumps({"chunk_bytes": shards.CHUNK, "sha256": ["0" * 64]}))
    with pytest.raises(IntegrityError, match=r"tp0_pp0_dp0\.sums\.json: sha256 does not match the manifest"):
        shards.read_elements(shards.ChunkReader(tmp_path, entries), index, key, 0, 5, GATED)
