"""Fine-tuning: weights from a checkpoint, supervised fine-tuning with the loss on response tokens only."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TRAIN_ENV, small_config, stdlib_files

from data_pipeline.prepare import prepare_dataset
from data_pipeline.sample_stream import SampleStream


@pytest.fixture(scope="module")
def sft_data(prepared, tmp_path_factory):
    """Prompt/response pairs cut from real source files, tokenized with the base model's tokenizer."""
    tmp = tmp_path_factory.mktemp("sft")
    lines = []
    for f in stdlib_files(80)[40:]:
        text = f.read_text()
        lines.append({"prompt": "# continue this file\n" + text[:150], "response": text[150:400]})
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = small_config(tmp, [str(tmp / "pairs.jsonl")], data={"format": "sft", "split": [0.8, 0.2, 0.0]},
                       tokenizer={"model_file": str(prepared / "tokenizer" / "tokenizer.model")})  # fmt: skip
    return prepare_dataset(cfg).output_dir, lines


def _decoder(run):
    from training.inference.evaluate import load_model

    return load_model(run / "checkpoints").decoder


def _losses(decoder, samples: np.ndarray) -> tuple[float, float]:
    """(mean loss over response tokens, mean loss over all tokens) of ``samples`` under ``decoder``."""
    t = torch.from_numpy(samples.astype(np.int64))
    inputs, labels = torch.where(t < 0, -t - 1, t)[:, :-1], t[:, 1:]
    logits, _ = decoder(inputs)
    nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.abs() - (labels < 0).long(),
                                             reduction="none")  # fmt: skip
    keep = labels >= 0
    return float((nats * keep).sum() / keep.sum()), float(nats.mean())


def test_sft_data_marks_exactly_the_prompt_tokens(sft_data, prepared):
    from data_pipeline.tokenizer import load_tokenizer

    root, lines = sft_data
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["dtype"] == "int32"
    sp = load_tokenizer(prepared / "tokenizer" / "tokenizer.model")
    stream = [SampleStream(root, s, shuffle=False) for s in ("train", "validation")]
    tokens = np.concatenate([np.concatenate(s.read(0, s.epoch_size))[:-1] for s in stream])
    assert (tokens < 0).sum() <= sum(len(sp.encode(x["prompt"])) for x in lines)
    assert (tokens < 0).sum() > 0.3 * sum(len(sp.encode(x["prompt"])) for x in lines)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == len(lines)


def test_sft_trains_only_on_responses_and_lowers_their_loss(base_model, sft_data, tmp_path):
    root, _ = sft_data
    run = tmp_path / "sft"
    cmd = [sys.executable, "-m", "launcher.cli", "finetune", "-c", "configs/tiny.yaml", f"run_dir={run}",
           f"data.output_dir={root}", f"model.init_from=ckpt:{base_model}/checkpoints", "train.max_steps=25",
           "train.eval_interval=25", "optim.lr=0.001", "optim.warmup_steps=0"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env={**__import__("os").environ, **TRAIN_ENV}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((run / "train_result.json").read_text())
    # step 1's loss is the base model's loss on the first batch's response tokens only
    first = SampleStream(root, "train", seed=1234, shuffle=True).read(0, 8)
    micro = [_losses(_decoder(base_model), np.stack(first[i : i + 2])) for i in range(0, 8, 2)]
    response_only = sum(m[0] for m in micro) / 4
    all_tokens = sum(m[1] for m in micro) / 4
    assert abs(result["losses"][0] - response_only) < 1e-4 and abs(result["losses"][0] - all_tokens) > 1e-2
    val = np.stack(SampleStream(root, "validation", shuffle=False).read(0, 8))
    before, after = _losses(_decoder(base_model), val)[0], _losses(_decoder(run), val)[0]
    assert after < before - 0.05, (before, after)


def test_finetune_needs_a_base(prepared, tmp_path):
    cmd = [sys.executable, "-m", "launcher.cli", "finetune", "-c", "configs/tiny.yaml", f"run_dir={tmp_path}/y",
           f"data.output_dir={prepared}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "model.init_from=ckpt:DIR" in r.stderr


def test_lora_trains_adapters_only_and_merged_equals_unmerged(base_model, prepared, tmp_path):
    from core.config import validate_config
    from training.checkpoint.reader import full_weights
    from training.inference.decode import Decoder
    from training.model.lora import merge

    run = tmp_path / "lora"
    cmd = [sys.executable, "-m", "launcher.cli", "finetune", "-c", "configs/tiny.yaml", f"run_dir={run}",
           f"data.output_dir={prepared}", f"model.init_from=ckpt:{base_model}/checkpoints", "lora.rank=4",
           "lora.alpha=8", "train.max_steps=12", "train.eval_interval=12", "optim.lr=0.01", "optim.warmup_steps=0",
           "parallel.nproc=2", "parallel.zero_stage=1"]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, env={**__import__("os").environ, **TRAIN_ENV}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    tuned, cfg, _ = full_weights(run / "checkpoints")
    base, _, _ = full_weights(base_model / "checkpoints")
    adapters = [k for k in tuned if ".lora_" in k]
    assert len(adapters) == 2 * 4 * 4  # A and B on 4 matrices of 4 layers
    assert all(torch.equal(tuned[k], base[k]) for k in base)  # the base weights are frozen
    assert all(tuned[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))  # the adapters trained
    m = validate_config(cfg).model
    unmerged = Decoder(tuned, m, lora_scale=8 / 4)
    merged = Decoder(merge(tuned, 8 / 4), m)
    tokens = torch.from_numpy(np.stack(SampleStream(prepared, "validation", shuffle=False).read(0, 4))).long()
    a, b = unmerged(tokens[:, :-1])[0], merged(tokens[:, :-1])[0]
    assert (a - b).abs().max() < 1e-5 and (a - Decoder(base, m)(tokens[:, :-1])[0]).abs().max() > 1e-3
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "launcher.cli", "checkpoint", "consolidate", str(run / "checkpoints"),
                        str(out), "--merge-lora"], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    merged_file = full_weights(out)[0]
    assert not any(".lora_" in k for k in merged_file) and (merged(tokens[:, :-1])[0] - Decoder(merged_file, m)(
        tokens[:, :-1])[0]).abs().max() < 1e-6  # fmt: skip


def test_finetune_refuses_data_of_another_tokenizer_and_a_base_whose_tokenizer_is_unknown(base_model, prepared,
                                                                                         tmp_path):  # fmt: skip
    import shutil

    from conftest import run_cli

    other = tmp_path / "other"
    shutil.copytree(prepared, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64  # as if prepared with another tokenizer
    (other / "manifest.json").write_text(json.dumps(manifest))
    ckpt = f"model.init_from=ckpt:{base_model}/checkpoints"
    r = run_cli("finetune", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / 'ft'}", f"data.output_dir={other}", ckpt)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "another tokenizer than the base model" in lines[0]
    folder = tmp_path / "consolidated"  # weights without trainer.json, whose run config names a missing dataset
    assert run_cli("checkpoint", "consolidate", f"{base_model}/checkpoints", str(folder)).returncode == 0
    config = json.loads((folder / "config.json").read_text())
    config["data"]["output_dir"] = str(tmp_path / "moved-away")
    (folder / "config.json").write_text(json.dumps(config))
    r = run_cli("finetune", "-c", "configs/tiny.yaml", f"run_dir={tmp_path / 'ft2'}", f"data.output_dir={prepared}",
                f"model.init_from=ckpt:{folder}")  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "cannot tell which tokenizer the base model" in lines[0]
    assert not (tmp_path / "ft").exists() and not (tmp_path / "ft2").exists()  # refused before anything started
