"""The decoder's linear layers at one tensor-parallel rank: torch's native linear, megatron's numbers.

The worker (``linear_worker.py``, one rank of a real process group) runs megatron-core's ``ColumnParallelLinear`` /
``RowParallelLinear`` and ``training.model.linear``'s on the same weights and input; the expected values are
megatron's layers' own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

# megatron's Python autograd functions around a TP linear: the product itself, the identity TP-region reduce
MEGATRON_FNS = ("LinearWithGradAccumulationAndAsyncCommunicationBackward", "_ReduceFromModelParallelRegionBackward")


@pytest.fixture(scope="module")
def compared() -> dict:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "tests/training/linear_worker.py")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case, n_params, bias_returned", [("column_bias", 2, False), ("column", 1, False),
                                                           ("row_skip_bias", 2, True), ("tied", 1, False)])  # fmt: skip
def test_one_rank_linear_is_torchs_own_with_megatrons_numbers(compared, case, n_params, bias_returned):
    c = compared[case]
    assert c["native"] and c["megatron_fn"] in MEGATRON_FNS and c["fn"] in ("AddBackward0", "UnsafeViewBackward0")
    assert c["shape"] == [7, 3, 40] and c["bias_returned"] == bias_returned
    assert c["out_scale"] > 1.0  # a real product, not zeros
    assert c["out"] <= 1e-5 and c["dx"] <= 1e-4
    assert len(c["grads"]) == n_params and max(c["grads"]) <= 1e-4  # weight (the tied one too) and bias


def test_the_decoder_builds_every_linear_native_at_one_rank(compared):
    layers = compared["decoder"]
    assert len(layers) == 2 * 4 + 1  # two layers of qkv, proj, fc1, fc2; the output head
    assert sorted({name for name, _, _ in layers}) == ["linear_fc1", "linear_fc2", "linear_proj", "linear_qkv",
                                                       "output_layer"]  # fmt: skip
    assert all(cls in ("ColumnLinear", "RowLinear") and native for _, cls, native in layers)


def test_the_decoder_layer_calls_megatrons_sublayers_with_the_same_numbers(compared):
    """Biases, RoPE, dropout 0.1 in training: the layer's direct sublayer calls (its attention batch-first) and
    megatron's TransformerLayer.forward draw the same dropout masks and give the same output and gradients (to the
    last bits: SDPA's dropout path multiplies the same numbers laid out differently)."""
    c = compared["decoder_layer"]
    assert c["batch_first"]
    assert c["other_masks"] > 1e-3 and c["scale"] > 0.1  # dropout draws masks: another seed, another output
    assert c["out"] <= 1e-6 * c["scale"] and c["dx"] <= 1e-5
    assert len(c["grads"]) == 10 and max(c["grads"]) <= 1e-4  # qkv, proj, fc1, fc2 weights and biases; two norms


def test_batch_first_attention_is_megatrons_bitwise_with_grouped_queries(compared):
    """Grouped-query attention (4 heads, 2 key/value groups), RoPE, biases, no dropout: the output and the input
    gradient bitwise megatron's; the weight gradients sum the same products over tokens in another order."""
    c = compared["decoder_layer_gqa"]
    assert c["batch_first"] and c["scale"] > 0.1
    assert c["out"] == 0.0 and c["dx"] == 0.0
    assert len(c["grads"]) == 10 and max(c["grads"]) <= 1e-5


def test_the_model_at_one_rank_is_batch_first_with_megatrons_numbers(compared):
    """Learned positions, tied embeddings, biases, RMSNorm: the model as built at one TP rank (every stage
    batch-first) and the same modules on megatron's [S, B, H] path (megatron's embedding forward, attention forward,
    the loss's label transpose) give the same logits and loss and, to float rounding (tokens summed in another
    order), gradients."""
    c = compared["model_layouts"]
    assert c["built_batch_first"] == [True] * 4  # embedding, two decoder layers, output head (the final norm has none)
    assert c["logits_shape"] == [3, 16, 256]  # [B, S, V padded to 128s] from the batch-first model itself
    assert c["logits_scale"] > 0.1 and c["logits"] <= 1e-6 * c["logits_scale"]
    assert c["loss"] <= 1e-6
    assert len(c["grads"]) == 23 and max(c["grads"]) <= 1e-5 * c["grad_scale"]  # 2 embeddings, 2 x 10, final norm
