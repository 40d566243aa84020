"""The whole `data prepare` pipeline on real files: packing, tokenizer, splits, manifest, safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import make_corpus, small_config, stdlib_files

from core.errors import DataError, IntegrityError
from core.files import sha256_file
from data_pipeline.filters import clean_text
from data_pipeline.manifest import read_manifest, verify_dataset
from data_pipeline.prepare import prepare_dataset
from data_pipeline.sample_stream import ShardReader, check_tokenizer
from data_pipeline.split import assign_split, content_digest
from data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID


def shard_tokens(ds: Path, split: str) -> np.ndarray:
    reader = ShardReader(str(ds), split)
    parts = [np.stack(reader.samples(i)) for i in range(len(reader.counts))]
    return np.concatenate(parts).reshape(-1) if parts else np.zeros(0, dtype=np.int64)


def test_shards_hold_documents_joined_with_eos_in_order(prepared):
    manifest = read_manifest(prepared)
    sp = spm.SentencePieceProcessor(model_file=str(prepared / manifest["tokenizer"]["file"]))
    for split in ("train", "validation", "test"):
        docs = [
            clean_text(f.read_text())
            for f in stdlib_files(60)
            if assign_split(content_digest(clean_text(f.read_text())), (0.8, 0.1, 0.1)) == split
        ]
        stream = np.concatenate([np.array(sp.encode(d) + [EOS_ID]) for d in docs])
        got = shard_tokens(prepared, split)
        info = manifest["splits"][split]
        L1 = manifest["sample_tokens"]
        assert info["documents"] == len(docs)
        assert info["samples"] == len(stream) // L1 and info["tokens"] == len(got)
        assert info["dropped_tail_tokens"] == len(stream) % L1
        np.testing.assert_array_equal(got, stream[: info["samples"] * L1])
        assert sum(s["samples"] for s in info["shards"]) == info["samples"]
    assert len(manifest["splits"]["train"]["shards"]) > 1  # shard_size_mb=0.25 forces several


def test_tokenizer_round_trips_code_and_has_fixed_special_ids(prepared):
    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer" / "tokenizer.model"))
    text = "def f(x):\n\tif x:\n        return 'é ✓ 🙂'\n\n\n"
    assert sp.decode(sp.encode(text)) == text
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert sp.get_piece_size() == 512 == read_manifest(prepared)["tokenizer"]["vocab_size"]


def test_manifest_verifies_and_detects_corruption(prepared, tmp_path):
    assert verify_dataset(prepared) == []
    ds = tmp_path / "copy"
    shutil.copytree(prepared, ds)
    manifest = read_manifest(ds)
    first = ds / manifest["splits"]["train"]["shards"][0]["path"]
    second = ds / manifest["splits"]["train"]["shards"][1]["path"]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:1000])
    problems = verify_dataset(ds)
    assert len(problems) == 2
    assert "shard-000000.tar: sha256 does not match" in problems[0]
    assert "shard-000001.tar: size 1000 != manifest" in problems[1]
    with pytest.raises(IntegrityError, match=r"shard '.*train/shard-000000.tar' does not match"):
        ShardReader(str(ds), "train").samples(0)


def test_same_inputs_reuse_and_different_dataset_is_never_overwritten(prepared, tmp_path):
    corpus = prepared.parent.parent / "corpus"  # the fixture's inputs, unchanged
    cfg = small_config(tmp_path, [str(corpus)], data={"output_dir": str(prepared)})
    assert prepare_dataset(cfg).reused
    before = (prepared / "manifest.json").read_text()
    other = small_config(tmp_path, [str(corpus)], data={"output_dir": str(prepared), "seq_length": 32})
    with pytest.raises(DataError, match=r"already holds a different dataset.*--overwrite"):
        prepare_dataset(other)
    assert (prepared / "manifest.json").read_text() == before
    assert verify_dataset(prepared) == []


def test_overwrite_replaces_atomically(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", 12)
    out = tmp_path / "ds"
    out.mkdir()
    (out / "stranger.txt").write_text("not a dataset")
    cfg = small_config(tmp_path, [str(corpus)], data={"output_dir": str(out)}, tokenizer={"vocab_size": 420})
    with pytest.raises(DataError, match="already holds"):
        prepare_dataset(cfg)
    res = prepare_dataset(cfg, overwrite=True)
    assert not (out / "stranger.txt").exists() and verify_dataset(out) == []
    assert res.manifest["splits"]["train"]["samples"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_midway_leaves_nothing_behind(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", 3)
    cfg = small_config(tmp_path, [str(corpus)], tokenizer={"vocab_size": 60000})
    with pytest.raises(DataError, match="could not train a 60000-piece tokenizer.*tokenizer.vocab_size"):
        prepare_dataset(cfg)
    out = Path(cfg.data.output_dir)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []


def test_empty_and_undecodable_corpora_fail_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="corpus is empty"):
        prepare_dataset(small_config(tmp_path, [str(tmp_path / "empty")]))
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "a.txt").write_bytes(b"\xe9t\xe9 " * 100)
    with pytest.raises(DataError, match=r"corpus is empty.*1 files skipped as invalid UTF-8"):
        prepare_dataset(small_config(tmp_path, [str(tmp_path / "latin")]))


def test_splits_are_stable_when_documents_are_added(tmp_path):
    small = make_corpus(tmp_path / "small", 20)
    big = make_corpus(tmp_path / "big", 50)
    members = {}
    for name, corpus in (("small", small), ("big", big)):
        cfg = small_config(tmp_path, [str(corpus)], data={"output_dir": str(tmp_path / name / "ds")})
        prepare_dataset(cfg)
        members[name] = {
            s: set((tmp_path / name / "ds" / "documents" / f"{s}.sha256").read_text().split())
            for s in ("train", "validation", "test")
        }
    assert sum(len(v) for v in members["small"].values()) >= 19
    for split, docs in members["small"].items():
        assert docs <= members["big"][split], split  # no old document moved to another split
    # and the fractions hold on many documents
    names = [assign_split(content_digest(str(i)), (0.8, 0.1, 0.1)) for i in range(20000)]
    assert abs(names.count("train") / 20000 - 0.8) < 0.01 and abs(names.count("test") / 20000 - 0.1) < 0.01


def test_output_does_not_depend_on_worker_count(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", 25)
    shas = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        cfg = small_config(tmp_path, [str(corpus)], data={"output_dir": str(out), "num_workers": workers})
        m = prepare_dataset(cfg).manifest
        shas.append([s["sha256"] for sp in m["splits"].values() for s in sp["shards"]] + [m["tokenizer"]["sha256"]])
    assert shas[0] == shas[1]


def test_reused_tokenizer_and_mismatched_tokenizer(prepared, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", 15)
    model = prepared / "tokenizer" / "tokenizer.model"
    cfg = small_config(tmp_path, [str(corpus)], tokenizer={"model_file": str(model)})
    m = prepare_dataset(cfg).manifest
    assert m["tokenizer"]["sha256"] == sha256_file(model)
    check_tokenizer(cfg.data.output_dir, model)  # matches: no error
    other = small_config(
        tmp_path, [str(corpus)], data={"output_dir": str(tmp_path / "o")}, tokenizer={"vocab_size": 420}
    )
    prepare_dataset(other)
    with pytest.raises(IntegrityError, match=r"tokenizer '.*tokenizer.model' .* does not match the shards"):
        check_tokenizer(str(tmp_path / "o"), model)


def test_manifest_records_config_and_filter_report(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["config"]["data"]["seq_length"] == 64 and m["seq_length"] == 64 and m["sample_tokens"] == 65
    assert m["ingest"]["documents"] == 60
    stages = m["filter_report"]["stages"]
    assert stages["clean"]["docs_in"] == 60
    kept = sum(m["splits"][s]["documents"] for s in m["splits"])
    assert kept == 60 - sum(v["docs_dropped"] for v in stages.values()) == m["filter_report"]["docs_out"]


def test_validation_from_its_own_files_is_held_out_of_training(tmp_path):
    """data.validation_inputs: every such document is the validation split, the hash share of validation goes to
    train, and a training document with the same content is left out of training (deduplication off here, so the
    content-hash exclusion alone does it)."""
    files = stdlib_files(26)
    train_dir, val_dir = tmp_path / "train", tmp_path / "val"
    train_dir.mkdir(), val_dir.mkdir()
    for f in files[:20]:
        shutil.copyfile(f, train_dir / f.name)
    for f in [*files[20:], files[3]]:  # files[3] is in both: held out
        shutil.copyfile(f, val_dir / f.name)
    cfg = small_config(tmp_path, [str(train_dir)], data={"validation_inputs": [str(val_dir)], "split": [0.8, 0.2, 0.0],
                       "dedup_exact": False, "dedup_near": False})  # fmt: skip
    m = prepare_dataset(cfg).manifest
    digest = lambda f: content_digest(clean_text(f.read_text())).hex()  # noqa: E731
    docs = cfg.data.output_dir + "/documents"
    got = {s: (Path(docs) / f"{s}.sha256").read_text().split() for s in ("train", "validation", "test")}
    assert sorted(got["validation"]) == sorted(digest(f) for f in [*files[20:], files[3]])
    assert sorted(got["train"]) == sorted(digest(f) for f in files[:20] if f != files[3])
    assert len(got["train"]) == 19 and len(got["validation"]) == 7 and got["test"] == []
    assert m["splits"]["validation"]["samples"] > 0
