"""The lm-eval harness adapter: lm-eval's own evaluator, given local task YAMLs, scores a Shardforge checkpoint
as `shardforge eval` does; its rolling log-likelihood and generation equal direct computations."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TRAIN_ENV, code_choice_items, hf_accuracy, run_cli

# datasets (under lm-eval) reads these when imported: keep its cache in the test's folder and never go online
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

MC_TASK = """task: sf_code_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_bytes
"""
ROLLING_TASK = """task: sf_code_bpb
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def task_files(base_model, prepared, tmp_path_factory) -> dict:
    """16 three-way items of real code against its reversal or shuffled words (multiple choice), whole documents
    (bits per byte), and the base model exported to Hugging Face format for independent expected values."""
    from data_pipeline.sample_stream import SampleStream
    from data_pipeline.tokenizer import load_tokenizer

    sp = load_tokenizer(prepared / "tokenizer" / "tokenizer.model")
    folder = tmp_path_factory.mktemp("harness")
    items = code_choice_items(sp, prepared, 16)
    docs = [sp.decode(s.tolist())[:300] for s in SampleStream(prepared, "test", shuffle=False).read(0, 4)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "mc.yaml").write_text(MC_TASK.format(data=folder / "mc.jsonl"))
    (folder / "tasks" / "bpb.yaml").write_text(ROLLING_TASK.format(data=folder / "docs.jsonl"))
    r = run_cli("export", "hf", "--checkpoint", str(base_model / "checkpoints"), "--out", str(folder / "hf"))
    assert r.returncode == 0, r.stderr
    return {"folder": folder, "docs": docs, "items": items, "sp": sp}


def hf_rolling_log_prob(hf, seq: list[int], window: int) -> float:
    """lm-eval's rolling rule, token by token: token i+1 is predicted from the window that ends at the end of the
    window holding it (windows of ``window`` tokens, the first predicted token being seq[1])."""
    total = 0.0
    for i in range(len(seq) - 1):
        end = min((i // window + 1) * window, len(seq) - 1)
        with torch.no_grad():
            logits = hf(torch.tensor([seq[max(0, end - window) : i + 1]])).logits[0, -1].double()
        total += float(torch.log_softmax(logits, -1)[seq[i + 1]])
    return total


def test_lm_eval_scores_a_checkpoint_like_shardforge_eval_and_transformers(base_model, task_files, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, ckpt = task_files["folder"], str(base_model / "checkpoints")
    env = {**os.environ, **TRAIN_ENV, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "launcher.cli", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)  # fmt: skip
    out = tmp_path / "harness.json"
    r = run("harness", "--checkpoint", ckpt, "--tasks", "sf_code_mc", "sf_code_bpb", "--include",
            str(folder / "tasks"), "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sf_code_mc" in r.stdout and "bits_per_byte" in r.stdout  # lm-eval's table
    harness = json.loads(out.read_text())["results"]
    ev = run("eval", "--checkpoint", ckpt, "--max-samples", "1", "--tasks", str(folder / "mc.jsonl"), "--out",
             str(tmp_path / "eval.json"))  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    ours = json.loads((tmp_path / "eval.json").read_text())["tasks"][0]  # what `shardforge eval --tasks` reports
    mc = harness["sf_code_mc"]
    assert ours["items"] == 16 and mc["acc,none"] == ours["acc"] and mc["acc_bytes,none"] == ours["acc_norm"]
    hf, sp = AutoModelForCausalLM.from_pretrained(folder / "hf").eval(), task_files["sp"]
    expected = hf_accuracy(hf, sp, task_files["items"])
    assert mc["acc,none"] == pytest.approx(expected, abs=1e-9) and expected >= 0.75

    nats = -sum(hf_rolling_log_prob(hf, [sp.eos_id(), *sp.encode(t)], 64) for t in task_files["docs"])
    nbytes = sum(len(t.encode("utf-8")) for t in task_files["docs"])
    assert math.isclose(harness["sf_code_bpb"]["bits_per_byte,none"], nats / nbytes / math.log(2), rel_tol=1e-5)
    r = run("harness", "--checkpoint", ckpt, "--tasks", "sf_code_mcq", "--include", str(folder / "tasks"))
    assert r.returncode == 2 and "lm-eval task 'sf_code_mcq' is not among the task YAMLs" in r.stderr


def test_rolling_windows_and_generation_equal_direct_computations(base_model, task_files):
    from lm_eval.api.instance import Instance

    from training.inference.decode import Sampling, generate
    from training.inference.harness import ShardforgeLM, cut_at_stop

    lm = ShardforgeLM(str(base_model / "checkpoints"), max_length=16)
    text = task_files["docs"][0]
    seq = [2, *lm.model.sp.encode(text)]
    assert len(seq) > 3 * 16
    # every token once, from the window lm-eval defines for it: one forward pass per token, no batching
    direct = 0.0
    for i in range(len(seq) - 1):
        end = min((i // 16 + 1) * 16, len(seq) - 1)
        logits, _ = lm.model.decoder(torch.tensor([seq[max(0, end - 16) : i + 1]]))
        direct += float(torch.log_softmax(logits[0, -1], -1)[seq[i + 1]])
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert lm.loglikelihood_rolling([req])[0] == pytest.approx(direct, rel=1e-5)
    full = ShardforgeLM(str(base_model / "checkpoints"), max_length=len(seq))  # one window: one pass
    whole = torch.log_softmax(full.model.decoder(torch.tensor([seq[:-1]]))[0][0], -1)
    one_pass = float(whole.gather(-1, torch.tensor(seq[1:])[:, None]).sum())
    assert full.loglikelihood_rolling([req])[0] == pytest.approx(one_pass, rel=1e-5) != direct

    prompt = "def main(argv):\n"
    greedy = list(generate(full.model.decoder, [2, *full.model.sp.encode(prompt)], full.model.vocab, Sampling(40, 0.0)))
    expected = cut_at_stop(full.model.sp.decode(greedy[: greedy.index(2)] if 2 in greedy else greedy), ["\n"])
    req = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 40}), 0)
    assert full.generate_until([req]) == [expected]
    # the continuation's tokens are those of the whole text after the context's: " x" alone would encode as
    # SentencePiece's dummy prefix plus a space, a token pair the model never saw after "return"
    sp = full.model.sp
    ctx, whole = sp.encode("def f(x):\n    return"), sp.encode("def f(x):\n    return x")
    cont = whole[len(ctx) :]
    assert whole[: len(ctx)] == ctx and cont != sp.encode(" x")
    [(ll, _)] = full.loglikelihood([Instance("loglikelihood", {}, ("def f(x):\n    return", " x"), 0)])
    logits, _ = full.model.decoder(torch.tensor([[2, *whole][:-1]]))
    lp = torch.log_softmax(logits[0, -len(cont) :], -1).gather(-1, torch.tensor(cont)[:, None])
    assert ll == pytest.approx(float(lp.sum()), rel=1e-5)
