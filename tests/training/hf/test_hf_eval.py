"""Hugging Face import and export, evaluation numbers, multiple-choice scoring and generation, against
`transformers` run on the same weights."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TRAIN_ENV, code_choice_items, hf_accuracy, layout_args, shardforge_train

from core.errors import ConfigError
from core.net import free_port

ENV = {**os.environ, **TRAIN_ENV}
# configs/tiny.yaml with grouped-query attention: the shape of the Llama made below
GQA = ["model.num_query_groups=2", "model.norm_eps=1e-6", "model.rope_base=5000"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny randomly initialized Llama, made and saved by transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5000.0,
                         max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # norms away from 1, so a mix-up of norm weights shows
        p.data.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("hf") / "tiny-llama"
    model.save_pretrained(out)
    return out


# configs/tiny.yaml as a GPT-2
GPT2 = ["model.normalization=LayerNorm", "model.activation=gelu_tanh", "model.position_embedding=learned",
        "model.bias=true", "model.tie_embeddings=true"]  # fmt: skip


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory) -> Path:
    """A tiny randomly initialized GPT-2 (biases, LayerNorm, learned positions, tied embeddings), by transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=4, n_head=4, n_inner=128,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    model = GPT2LMHeadModel(config)
    for p in model.parameters():  # biases and norms away from 0 and 1, so a mix-up shows
        p.data.add_(torch.randn_like(p) * 0.05)
    out = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(out)
    return out


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of the reference."""
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _hf_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(tokens).logits


def _shardforge_logits(tmp: Path, tokens: torch.Tensor, tp: int, *overrides: str, env=ENV) -> torch.Tensor:
    tok_file, out = tmp / f"tokens{tp}.pt", tmp / f"logits{tp}.pt"
    torch.save(tokens, tok_file)
    worker = [str(REPO / "tests/training/hf/logits_worker.py"), "configs/tiny.yaml", "512", str(tok_file), str(out)]
    args = [*worker, *layout_args(tp=tp), *overrides]
    port = f"--master_port={free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}", port, *args]
    r = subprocess.run(cmd if tp > 1 else [sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=180)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("tp", [1, 2])
def test_import_matches_transformers_logits(hf_llama, tmp_path, tp):
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = _shardforge_logits(tmp_path, tokens, tp, f"model.init_from=hf:{hf_llama}", *GQA)
    theirs = _hf_logits(hf_llama, tokens)
    assert ours.shape == theirs.shape == (2, 24, 512)
    assert rel_err(ours, theirs) < 1e-5
    if tp == 1:  # the KV-cache decoder used by eval/generate computes the same logits
        from core.config import load_config
        from training.hf.llama import load_init_weights
        from training.inference.decode import Decoder

        m = load_config(REPO / "configs/tiny.yaml", GQA).model
        logits, _ = Decoder(load_init_weights(f"hf:{hf_llama}", m, 512), m)(tokens)
        assert (logits - ours).abs().max() < 1e-5


def test_import_at_tp2_pp2_trains_from_transformers_loss(hf_llama, prepared, tmp_path):
    """model.init_from=hf:DIR at TP=2 x PP=2: the first step's loss, computed before any update, equals the loss
    transformers computes with the same model on the same global batch (the unshuffled first 8 train samples)."""
    from transformers import AutoModelForCausalLM

    from data_pipeline.sample_stream import SampleStream

    r, res = shardforge_train(tmp_path / "run", prepared, f"model.init_from=hf:{hf_llama}", *GQA, "train.max_steps=1",
                              "loader.shuffle=false", *layout_args(tp=2, pp=2, zero=1))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    samples = torch.from_numpy(np.stack(SampleStream(prepared, "train", shuffle=False).read(0, 8))).long()
    hf = AutoModelForCausalLM.from_pretrained(hf_llama).eval()
    with torch.no_grad():
        logits = hf(samples[:, :-1]).logits
    expected = float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), samples[:, 1:]))
    assert len(res["losses"]) == 1 and math.isclose(res["losses"][0], expected, rel_tol=1e-5)


def test_gpt2_import_matches_transformers_logits_at_tp2(hf_gpt2, tmp_path):
    from core.config import load_config
    from training.hf.llama import load_init_weights
    from training.inference.decode import Decoder

    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))
    ours = _shardforge_logits(tmp_path, tokens, 2, f"model.init_from=hf:{hf_gpt2}", *GPT2)
    theirs = _hf_logits(hf_gpt2, tokens)
    assert ours.shape == theirs.shape == (2, 24, 512)
    assert rel_err(ours, theirs) < 1e-5
    m = load_config(REPO / "configs/tiny.yaml", GPT2).model
    logits, _ = Decoder(load_init_weights(f"hf:{hf_gpt2}", m, 512, 64), m)(tokens)
    assert (logits - ours).abs().max() < 1e-5
    wrong = load_config(REPO / "configs/tiny.yaml", [*GPT2, "model.activation=gelu"]).model
    with pytest.raises(ConfigError, match=r"needs model\.activation=gelu_tanh"):
        load_init_weights(f"hf:{hf_gpt2}", wrong, 512, 64)


def test_decoder_matches_megatron_with_layernorm_gelu_learned_positions_and_tied_embeddings(tmp_path):
    """The eval/generate decoder on the options a Llama does not use, every weight moved off its init (so a
    LayerNorm bias left out shows)."""
    from core.config import load_config
    from training.inference.decode import Decoder

    options = ["model.normalization=LayerNorm", "model.activation=gelu", "model.position_embedding=learned",
               "model.tie_embeddings=true"]  # fmt: skip
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    megatron = _shardforge_logits(tmp_path, tokens, 1, *options, env={**ENV, "LOGITS_WORKER_PERTURB": "1"})
    weights = torch.load(tmp_path / "logits1.pt.weights", weights_only=True)
    assert any(k.endswith("layernorm.bias") and v.abs().max() > 0.01 for k, v in weights.items())
    m = load_config(REPO / "configs/tiny.yaml", options).model
    ours, _ = Decoder(weights, m)(tokens)
    assert (ours - megatron).abs().max() < 1e-5


def test_import_refuses_a_missing_or_mismatched_folder(hf_llama, prepared, tmp_path):
    from core.config import load_config
    from core.errors import ConfigError
    from training.hf.llama import load_init_weights

    r, _ = shardforge_train(tmp_path / "a", prepared, f"model.init_from=hf:{tmp_path}/nope", *GQA)
    assert r.returncode == 2 and "does not exist" in r.stderr  # through the CLI: one line, exit 2
    m = load_config(REPO / "configs/tiny.yaml", ["model.num_query_groups=4"]).model
    with pytest.raises(ConfigError, match="num_key_value_heads=2 but model.num_query_groups is 4"):
        load_init_weights(f"hf:{hf_llama}", m, 512)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((hf_llama / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle"):
        load_init_weights(f"hf:{tmp_path / 'pickle'}", m, 512)


@pytest.fixture(scope="module")
def trained(base_model) -> Path:
    """The tiny model trained at TP=2 (the session's base model)."""
    return base_model


def test_export_loads_in_transformers_with_equal_logits_and_greedy_tokens(trained, prepared, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.inference.decode import Sampling, generate
    from training.inference.evaluate import load_model

    out = tmp_path / "hf-export"
    r = cli("export", "hf", "--checkpoint", str(trained / "checkpoints"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    ours = load_model(trained / "checkpoints")
    prompt = ours.sp.encode("import os\n\ndef main(argv):\n")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits
    mine, _ = ours.decoder(torch.tensor([prompt]))
    assert (mine[..., :512] - theirs).abs().max() < 1e-4
    greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    assert greedy[0, len(prompt) :].tolist() == list(generate(ours.decoder, prompt, 512, Sampling(24, 0.0)))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("def f(x):\n    return x", add_special_tokens=False) == ours.sp.encode("def f(x):\n    return x")
    again = cli("export", "hf", "--checkpoint", str(trained / "checkpoints"), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing export is not overwritten


def _direct_bytes(sp, targets: list[int], first_mid_document: bool) -> int:
    """UTF-8 bytes of the text the target tokens stand for, decoded by SentencePiece segment by segment."""
    total, seg, first = 0, [], True
    for t in [*targets, sp.eos_id()]:
        if t == sp.eos_id():
            if seg:
                text = sp.decode(seg)
                lead = first and first_mid_document and sp.id_to_piece(seg[0]).startswith("\u2581")
                total += len(text.encode("utf-8")) + int(lead)
            seg, first = [], False
        else:
            seg.append(t)
    return total


def test_eval_numbers_equal_a_direct_computation(trained, prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    from data_pipeline.sample_stream import SampleStream
    from training.inference.evaluate import load_model

    out = tmp_path / "eval.json"
    r = cli("eval", "--checkpoint", str(trained / "checkpoints"), "--max-samples", "6", "--out", str(out))
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())["test"]
    cli("export", "hf", "--checkpoint", str(trained / "checkpoints"), "--out", str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    samples = torch.from_numpy(np.stack(SampleStream(prepared, "test", shuffle=False).read(0, 6))).long()
    with torch.no_grad():
        logits = hf(samples[:, :-1]).logits
    nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), samples[:, 1:], reduction="none").double()
    sp = load_model(trained / "checkpoints").sp
    nbytes = sum(_direct_bytes(sp, s[1:].tolist(), s[0].item() != sp.eos_id()) for s in samples)
    assert got["samples"] == 6 and got["tokens"] == samples[:, 1:].numel() and got["bytes"] == nbytes
    assert math.isclose(got["loss"], float(nats.mean()), rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(float(nats.mean())), rel_tol=1e-5)
    assert math.isclose(got["bits_per_byte"], float(nats.sum()) / math.log(2) / nbytes, rel_tol=1e-5)
    assert "bits per byte" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag, value in (("eval/test_loss", got["loss"]), ("eval/test_perplexity", got["perplexity"]),
                       ("eval/test_bits_per_byte", got["bits_per_byte"])):  # fmt: skip
        assert any(e.step == 40 and math.isclose(e.value, value, rel_tol=1e-6) for e in acc.Scalars(tag)), tag


def test_multiple_choice_accuracy_equals_transformers_and_ignores_choice_order(trained, prepared, tmp_path):
    """Three choices per item (real code, the same characters reversed, its words shuffled): `shardforge eval`'s
    accuracy equals the one computed here with transformers on the exported model, and putting the right answer
    last instead of first (answer index changed with it) changes nothing."""
    from transformers import AutoModelForCausalLM

    from data_pipeline.tokenizer import load_tokenizer

    sp = load_tokenizer(prepared / "tokenizer" / "tokenizer.model")
    items = code_choice_items(sp, prepared, 16)
    first, last = tmp_path / "first.jsonl", tmp_path / "last.jsonl"
    first.write_text("".join(json.dumps(i) + "\n" for i in items))
    last.write_text("".join(json.dumps({**i, "choices": i["choices"][::-1], "answer": 2}) + "\n" for i in items))
    out = tmp_path / "mc.json"
    r = cli("eval", "--checkpoint", str(trained / "checkpoints"), "--max-samples", "2", "--tasks", str(first),
            str(last), "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    tasks = {t["task"]: t for t in json.loads(out.read_text())["tasks"]}
    exported = cli("export", "hf", "--checkpoint", str(trained / "checkpoints"), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr
    expected = hf_accuracy(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), sp, items)
    assert tasks["first"]["acc"] == pytest.approx(expected, abs=1e-9) and tasks["last"]["acc"] == tasks["first"]["acc"]
    assert expected >= 0.75  # a model trained on code prefers real code to reversed or shuffled text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "answer": 3}\n')
    r = cli("eval", "--checkpoint", str(trained / "checkpoints"), "--max-samples", "1", "--tasks", str(bad))
    assert r.returncode == 2 and f"{bad}:1: not a task line" in r.stderr


def test_generation_is_seeded_and_cached_decoding_equals_full_recompute(trained):
    from training.inference.decode import Sampling, generate
    from training.inference.evaluate import load_model

    model = load_model(trained / "checkpoints")
    prompt = model.sp.encode("class Foo:\n")
    s = Sampling(16, temperature=0.9, top_k=40, top_p=0.9, seed=3)
    a, b = list(generate(model.decoder, prompt, 512, s)), list(generate(model.decoder, prompt, 512, s))
    assert a == b and a != list(generate(model.decoder, prompt, 512, Sampling(16, 0.9, 40, 0.9, seed=4)))
    greedy = list(generate(model.decoder, prompt, 512, Sampling(12, 0.0)))
    ids = list(prompt)
    for _ in range(12):  # no cache: recompute the whole sequence each step
        logits, _ = model.decoder(torch.tensor([ids]))
        ids.append(int(logits[0, -1, :512].argmax()))
    assert ids[len(prompt) :] == greedy
    r = cli("generate", "--checkpoint", str(trained / "checkpoints"), "--prompt", "def ", "--temperature", "0",
            "--max-new-tokens", "12")  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("def ")


def test_gzip_baseline_is_gzip_of_the_decoded_documents(prepared):
    """The gzip figure beside bits per byte: gzip -9 of the very documents the samples hold (decoded, one newline
    between documents), in compressed bits per byte."""
    import gzip

    import sentencepiece as spm
    from conftest import stdlib_files

    from training.inference.evaluate import EOS_ID, gzip_bits_per_byte

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer" / "tokenizer.model"))
    a, b = (f.read_text() for f in stdlib_files(2))
    ids = sp.encode(a) + [EOS_ID] + sp.encode(b) + [EOS_ID]
    samples = torch.tensor(ids).view(1, -1)
    text = (a + "\n" + b).encode("utf-8")
    expected = 8 * len(gzip.compress(text, compresslevel=9)) / len(text)
    assert gzip_bits_per_byte(sp, samples) == pytest.approx(expected, rel=1e-12)
    assert 1.0 < expected < 4.0  # two short source files: about 3 bits per byte
