"""Training on real shards: the loss falls, validation and early stopping trigger, TensorBoard holds every tag,
RNN baselines train data-parallel, bad layouts fail before a rank starts, non-finite losses stop the run."""

from __future__ import annotations

import json

from conftest import shardforge_train

from core.errors import EXIT_USAGE


def run_train(tmp_path, prepared, *overrides, name="run"):
    run = tmp_path / name
    r, result = shardforge_train(run, prepared, *overrides)
    return r, result, run


def mean(xs):
    return sum(xs) / len(xs)


def test_loss_falls_validation_runs_and_tensorboard_has_every_tag(tmp_path, prepared):
    r, res, run = run_train(
        tmp_path,
        prepared,
        "train.max_steps=30",
        "train.eval_interval=10",
        "optim.clip_grad=1.0",
        "optim.warmup_steps=3",
        "logging.log_interval=5",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert mean(res["losses"][-5:]) < mean(res["losses"][:5]) - 0.5
    assert [s for s, _ in res["val"]] == [10, 20, 30] and res["val"][-1][1] < res["val"][0][1]
    assert "validation loss" in r.stdout and "tok/s" in r.stdout and "mfu" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "val/loss",
        "val/ppl",
        "perf/tokens_per_s",
        "perf/mfu",
        "perf/data_wait_frac",
        "perf/step_time_s",
        "mem/rss_gb",
    ):
        assert tag in tags, tag
    step_times = [e.value for e in acc.Scalars("perf/step_time_s")]
    assert len(step_times) == 30 and all(abs(a - b) <= 1e-6 * b for a, b in zip(step_times, res["step_times"]))
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 31))
    assert [round(e.value, 4) for e in acc.Scalars("train/loss")] == [round(x, 4) for x in res["losses"]]
    assert [e.step for e in acc.Scalars("val/loss")] == [10, 20, 30]
    assert any("config" in t for t in acc.Tags()["tensors"])


def test_early_stopping_with_patience(tmp_path, prepared):
    r, res, _ = run_train(
        tmp_path,
        prepared,
        "train.max_steps=40",
        "train.eval_interval=2",
        "optim.lr=1e-7",
        "train.early_stopping_patience=2",
        "train.early_stopping_min_delta=0.01",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert res["steps"] == 6 and res["stop_reason"].startswith("early stopping")


def test_lstm_and_gru_train_data_parallel_with_zero(tmp_path, prepared):
    for arch in ("lstm", "gru"):
        r, res, _ = run_train(
            tmp_path,
            prepared,
            f"model.arch={arch}",
            "model.num_layers=1",
            "parallel.nproc=2",
            "parallel.zero_stage=2",
            "train.max_steps=20",
            "optim.clip_grad=1.0",
            "optim.lr=0.01",
            name=arch,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert "dp=2 zero=2" in res["layout"]
        assert mean(res["losses"][-3:]) < mean(res["losses"][:3]) - 0.3, arch


def test_bad_layouts_fail_before_any_rank_starts(tmp_path, prepared):
    cases = [
        (["parallel.nproc=3", "parallel.tp=2"], "does not equal parallel.nproc=3"),
        (
            ["parallel.nproc=2", "parallel.tp=2", "model.num_attention_heads=3", "model.hidden_size=63"],
            "num_attention_heads=3 is not divisible by parallel.tp=2",
        ),
        (["parallel.nproc=2", "parallel.pp=2", "model.num_layers=3"], "num_layers=3 is not divisible"),
        (["parallel.nproc=2", "parallel.pp=2", "parallel.zero_stage=2"], "cannot be combined with parallel.pp=2"),
        (["parallel.nproc=2", "parallel.tp=2", "model.arch=gru"], "supports only data parallelism"),
        (["parallel.nproc=2", "parallel.tp=2", "lora.rank=4"], "lora.rank > 0 needs model.arch=gpt"),
    ]
    for overrides, message in cases:
        r, _, run = run_train(tmp_path, prepared, *overrides)
        assert r.returncode == EXIT_USAGE, overrides
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not run.exists()  # nothing started, nothing written


def test_non_finite_losses_stop_the_run_with_a_clear_message(tmp_path, prepared):
    r, _, _ = run_train(
        tmp_path,
        prepared,
        "optim.name=sgd",
        "optim.lr=1e30",
        "optim.clip_grad=0",
        "optim.warmup_steps=0",
        "train.max_steps=30",
        "train.max_consecutive_skips=2",
    )
    assert r.returncode == EXIT_USAGE
    assert "loss was not finite for 2 steps in a row" in r.stderr


def test_bf16_tracks_fp32(tmp_path, prepared):
    _, fp32, _ = run_train(tmp_path, prepared, "train.max_steps=8", "optim.clip_grad=1.0", name="fp32")
    r, bf16, _ = run_train(
        tmp_path,
        prepared,
        "train.max_steps=8",
        "optim.clip_grad=1.0",
        "train.precision=bf16",
        "parallel.zero_stage=1",
        name="bf16",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(fp32["losses"]) == len(bf16["losses"]) == 8
    assert max(abs(a - b) for a, b in zip(fp32["losses"], bf16["losses"])) < 0.05
    assert bf16["losses"] != fp32["losses"]  # it really ran in bf16


def test_blended_datasets_train_and_a_foreign_tokenizer_is_refused(tmp_path, prepared):
    from conftest import make_corpus, small_config

    from data_pipeline.prepare import prepare_dataset

    corpus = make_corpus(tmp_path / "corpus", 15)
    same_tok = small_config(
        tmp_path,
        [str(corpus)],
        data={"output_dir": str(tmp_path / "same")},
        tokenizer={"model_file": str(prepared / "tokenizer" / "tokenizer.model")},
    )
    prepare_dataset(same_tok)
    blend = f"loader.blend=[{{path: {prepared}, weight: 3}}, {{path: {tmp_path / 'same'}, weight: 1}}]"
    r, res, _ = run_train(tmp_path, prepared, "train.max_steps=6", blend, name="blend")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(res["losses"]) == 6
    state = json.loads((tmp_path / "blend" / "checkpoints" / "step_00000006" / "trainer.json").read_text())
    assert state["loader"]["stream"]["drawn"] == [36, 12]  # 6 steps x 8 samples, 3:1
    other = small_config(
        tmp_path, [str(corpus)], data={"output_dir": str(tmp_path / "other")}, tokenizer={"vocab_size": 420}
    )
    prepare_dataset(other)
    foreign = f"loader.blend=[{{path: {prepared}, weight: 1}}, {{path: {tmp_path / 'other'}, weight: 1}}]"
    r, _, _ = run_train(tmp_path, prepared, "train.max_steps=2", foreign, name="foreign")
    assert r.returncode == EXIT_USAGE and "another tokenizer" in r.stderr
