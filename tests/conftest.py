"""Shared fixtures: small real corpora (copies of standard-library sources) and a prepared dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import load_config, validate_config
from data_pipeline.ingest import default_corpus_root

REPO = Path(__file__).resolve().parents[1]


def stdlib_files(n: int, pattern: str = "*.py") -> list[Path]:
    """``n`` real source files from the standard library (deterministic for a Python version)."""
    root = default_corpus_root()
    files = sorted(p for p in root.glob(pattern) if p.stat().st_size > 2000)
    return files[:n]


def make_corpus(dest: Path, n: int = 40) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in stdlib_files(n):
        shutil.copyfile(f, dest / f.name)
    return dest


def small_config(tmp: Path, inputs: list[str], **sections) -> object:
    raw = {
        "run_dir": str(tmp / "run"),
        "data": {
            "inputs": inputs,
            "seq_length": 64,
            "split": [0.8, 0.1, 0.1],
            "shard_size_mb": 0.25,
            "num_workers": 2,
        },
        "tokenizer": {"vocab_size": 512, "sample_mb": 1.0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return validate_config(raw, "test")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A prepared dataset of 60 standard-library files (seq_length 64, vocab 512)."""
    from data_pipeline.prepare import prepare_dataset

    tmp = tmp_path_factory.mktemp("prepared")
    corpus = make_corpus(tmp / "corpus", 60)
    cfg = small_config(tmp, [str(corpus)])
    return prepare_dataset(cfg).output_dir


@pytest.fixture(scope="session")
def base_model(prepared, tmp_path_factory) -> Path:
    """configs/tiny.yaml trained 40 steps on ``prepared`` at TP=2: the base for export, evaluation, fine-tuning
    and compression (enough steps to tell code from reversed code)."""
    run = tmp_path_factory.mktemp("base") / "run"
    r, _ = shardforge_train(run, prepared, "train.max_steps=40", "train.eval_interval=40", *layout_args(tp=2))
    assert r.returncode == 0, r.stderr[-2000:]
    return run


@pytest.fixture
def quickstart_config():
    return load_config(REPO / "configs" / "quickstart.yaml")


TRAIN_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run_ranks(worker: Path, *args: str, world: int = 2, timeout: float = 300) -> list[str]:
    """Start ``world`` real ranks of a worker script (rank variables and a free rendezvous port set), wait for
    them, and assert each exited 0; returns each rank's stderr."""
    from core.net import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, **TRAIN_ENV, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(worker), *args], cwd=REPO, env=env, stderr=subprocess.PIPE,
                                      text=True))  # fmt: skip
    try:
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * world, [e[-2000:] for e in errors]
    return errors


def layout_args(tp: int = 1, pp: int = 1, dp: int = 1, zero: int = 0) -> list[str]:
    """Overrides for a (TP, PP, DP, ZeRO) layout."""
    return [f"parallel.nproc={tp * pp * dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero_stage={zero}"]


def train_command(run: Path, prepared: Path, *overrides: str) -> list[str]:
    """`shardforge train` on configs/tiny.yaml into ``run``, reading the dataset ``prepared``."""
    return [
        sys.executable,
        "-m",
        "launcher.cli",
        "train",
        "-c",
        "configs/tiny.yaml",
        f"run_dir={run}",
        f"data.output_dir={prepared}",
        *overrides,
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`shardforge ARGS` from the repository root (CPU DeepSpeed, one thread per rank), output captured."""
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, env={**os.environ, **TRAIN_ENV},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def shardforge_train(run: Path, prepared: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run `shardforge train` to the end; return the process and its train_result.json (None if not written)."""
    r = subprocess.run(
        train_command(run, prepared, *overrides),
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    result_file = run / "train_result.json"
    return r, json.loads(result_file.read_text()) if result_file.exists() else None


def assert_losses_close(got: list[float], expected: list[float], rel: float, what: str = "") -> None:
    """Same number of losses, each within ``rel`` (relative) of the expected one."""
    assert len(got) == len(expected), f"{len(got)} losses vs {len(expected)} expected {what}"
    for step, (a, b) in enumerate(zip(got, expected), 1):
        assert abs(a - b) / abs(b) < rel, f"step {step}: {a} vs {b} {what}"


def final_weights(run: Path) -> dict:
    """The full weights of ``run``'s latest checkpoint, through `shardforge checkpoint consolidate`."""
    from safetensors.torch import load_file

    out = run / "consolidated"
    subprocess.run(
        [sys.executable, "-m", "launcher.cli", "checkpoint", "consolidate", str(run / "checkpoints"), str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return load_file(str(out / "model.safetensors"))


def hf_choice_log_prob(hf, sp, context: str, choice: str) -> float:
    """log P(choice | end-of-document + context) by transformers, with lm-eval's rule: the choice's tokens are those
    of context + choice encoded whole, after the context's."""
    ctx = [sp.eos_id()] + sp.encode(context)
    whole = [sp.eos_id()] + sp.encode(context + choice)
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([whole[:-1]])).logits[0].double(), dim=-1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def code_choice_items(sp, prepared: Path, n: int, seed: int = 3) -> list[dict]:
    """``n`` three-way multiple-choice items from the test split: a context of real code, then its true
    continuation (answer 0), the same characters reversed, or its words shuffled (three different texts)."""
    import random

    from data_pipeline.sample_stream import SampleStream

    rng, items = random.Random(seed), []
    for s in SampleStream(prepared, "test", shuffle=False).read(0, 4 * n):
        text = sp.decode(s.tolist())
        ctx, cont = text[:80], text[80:140]
        words = cont.split(" ")
        rng.shuffle(words)
        choices = [cont, cont[::-1], " ".join(words)]
        if len(set(choices)) == 3:  # identical choices would tie, and a tie is decided by position
            items.append({"context": ctx, "choices": choices, "answer": 0})
    assert len(items) >= n
    return items[:n]


def hf_accuracy(hf, sp, items: list[dict]) -> float:
    scores = [[hf_choice_log_prob(hf, sp, i["context"], c) for c in i["choices"]] for i in items]
    return sum(max(range(len(row)), key=row.__getitem__) == i["answer"] for row, i in zip(scores, items)) / len(items)


SLURM_TEST_CLUSTER = {"SHARDFORGE_SLURM_DIR": "/tmp/shardforge-slurm-tests", "SHARDFORGE_SLURM_NODES": "2",
                      "SHARDFORGE_SLURM_PORT": "16937"}  # fmt: skip


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start the local cluster (installing the Debian packages if needed); stop it after the session."""
    env = {**os.environ, **SLURM_TEST_CLUSTER}
    script = str(REPO / "slurm" / "local-cluster.sh")
    r = subprocess.run(["bash", script, "up"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"local Slurm did not start:\n{r.stdout}\n{r.stderr}"
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = SLURM_TEST_CLUSTER["SHARDFORGE_SLURM_DIR"] + "/slurm.conf"
    yield Path(SLURM_TEST_CLUSTER["SHARDFORGE_SLURM_DIR"])
    subprocess.run(["bash", script, "down"], env=env, capture_output=True, timeout=120)
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def assert_same_tensors(a: Path, b: Path) -> list[str]:
    """Two safetensors files hold the same names with bitwise equal tensors; returns the names."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    assert len(x) > 0 and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), b
    return list(x)


def assert_same_model_state(run_a: Path, run_b: Path) -> None:
    """The latest checkpoints of two runs hold bitwise equal weights and optimizer states in the same files (a
    direct read of the checkpoint's model/ files: stricter than the consolidated weights, and no extra start)."""
    roots = [run / "checkpoints" for run in (run_a, run_b)]
    folders = [root / (root / "latest").read_text().strip() / "model" for root in roots]
    names = sorted(p.name for p in folders[0].glob("*.safetensors"))
    assert names and names == sorted(p.name for p in folders[1].glob("*.safetensors"))
    keys = [k for name in names for k in assert_same_tensors(folders[0] / name, folders[1] / name)]
    assert {k.split("/")[0] for k in keys} >= {"param", "exp_avg", "exp_avg_sq"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite in two pytest workers (`-n 2 --dist loadgroup`): a module's tests stay on one
    worker (its module fixtures run once), and every Slurm test shares the worker that started the local cluster.
    First among the hooks: pytest-xdist's, registered after this file, would otherwise read the groups before
    they are set."""
    for item in items:
        rel = item.path.relative_to(REPO / "tests")
        group = "slurm" if rel.parts[0] == "slurm" else rel.as_posix()
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session):
    """In a pytest-xdist worker of `--dist loadgroup`, stop unless xdist put the groups into the test ids. They were
    silently dropped before (the groups were set after xdist read them, and xdist 3.8 writes ``item._nodeid``, which
    pytest 9 no longer reads): the Slurm tests ran on both workers, each starting and stopping the same cluster."""
    if os.environ.get("PYTEST_XDIST_WORKER") and session.config.getoption("loadgroup", False) and session.items:
        if "@" not in session.items[0].nodeid:
            raise pytest.UsageError(
                "pytest-xdist ignored the test groups (pin pytest and pytest-xdist as in "
                "constraints.txt): the Slurm tests would share one cluster across workers"
            )
