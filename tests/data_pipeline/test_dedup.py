"""Deduplication split over tasks: planted copies across tasks are found, partitions split the work, and the
tokenizer sample does not depend on how the corpus is cut."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_corpus, small_config, stdlib_files

from core.config import DataConfig
from data_pipeline import stages
from data_pipeline.dedup import EXACT, NEAR, RecordWriter, find_removals, read_partition, removals_for_task
from data_pipeline.filters import MinHashSigner, clean_text
from data_pipeline.prepare import hash_split_fractions
from data_pipeline.split import content_digest


def _near_copy(text: str) -> str:
    """One word replaced: word 5-gram Jaccard about 0.97 for these files of 300+ words."""
    i = text.index(" def ") if " def " in text else text.index(" ")
    return text[:i] + " zzqx" + text[i + 4 :]


def _tasks() -> tuple[list[list[str]], dict[int, dict[int, int]]]:
    t = [clean_text(f.read_text()) for f in stdlib_files(9)]
    a, b, c = t[0:3], t[3:6], t[6:9]
    docs = [
        [a[0], a[1], a[2], _near_copy(b[1])],  # the near copy comes first: b[1] in task 1 is the later one
        [b[0], b[1], a[1], b[2]],  # a[1]: an exact copy of task 0's
        [c[0], a[1], _near_copy(a[2]), c[2]],
    ]
    expected = {0: {}, 1: {1: NEAR, 2: EXACT}, 2: {1: EXACT, 2: NEAR}}
    return docs, expected


def _removals(tmp_path, docs: list[list[str]], partitions: int) -> tuple[dict, list[int]]:
    cfg, signer = DataConfig(), MinHashSigner(128, 5)
    counts = []
    for task, texts in enumerate(docs):
        w = RecordWriter(cfg, task, partitions)
        for text in texts:
            w.add(content_digest(text), signer.hashvalues(text), held=False)
        counts.append(w.save(tmp_path / f"rec{task}-{partitions}.npy"))
    removal_files, per_part = [], []
    for part in range(partitions):
        recs = [read_partition(tmp_path / f"rec{t}-{partitions}.npy", counts[t], part) for t in range(len(docs))]
        assert all((r["part"] == part).all() for r in recs)  # each dedup task reads its own partition only
        per_part.append(sum(len(r) for r in recs))
        np.save(tmp_path / f"rem{part}-{partitions}.npy", find_removals(np.concatenate(recs), True, True))
        removal_files.append(tmp_path / f"rem{part}-{partitions}.npy")
    return {t: removals_for_task(removal_files, t) for t in range(len(docs))}, per_part


@pytest.mark.parametrize("partitions", [1, 4])
def test_planted_copies_across_tasks_are_found_whatever_the_partitions(tmp_path, partitions):
    docs, expected = _tasks()
    got, per_part = _removals(tmp_path, docs, partitions)
    assert got == expected
    bands = RecordWriter(DataConfig(), 0, 1).bands
    assert sum(per_part) == 12 * (1 + bands)  # one digest and one record per band for each of the 12 documents
    assert len(per_part) == partitions and (partitions == 1 or max(per_part) < sum(per_part) / 2)


def test_dedup_off_keeps_copies_but_never_a_copy_of_a_held_out_document():
    from data_pipeline.dedup import HELD_OUT

    text = clean_text(stdlib_files(1)[0].read_text())
    w = RecordWriter(DataConfig(), 0, 1)
    w.add(content_digest(text), None, held=True)  # a validation input
    w.add(content_digest(text), None, held=False)  # the same text among the training inputs
    w.add(content_digest(text), None, held=False)
    rem = find_removals(w.array(), dedup_exact=False, dedup_near=False)
    assert rem["id"].tolist() == [1, 2] and rem["reason"].tolist() == [HELD_OUT, HELD_OUT]
    rem = find_removals(w.array(), dedup_exact=True, dedup_near=False)
    assert rem["reason"].tolist() == [EXACT, EXACT]


def _sample(tmp_path, cfg, tasks: int) -> tuple[list[str], int]:
    """The tokenizer sample and the train split's bytes, from the stages run with ``tasks`` map tasks."""
    tmp = tmp_path / f"stages{tasks}"
    groups = stages.plan_groups(cfg.data, {}, tasks)
    for t, g in enumerate(groups):
        stages.run_map(tmp, g, t, tasks, hash_split_fractions(cfg.data))
    for part in range(tasks):
        stages.run_dedup(tmp, cfg.data, part, tasks)
    rate = stages.sample_rate(cfg, tmp, tasks)
    train = sum(stages.run_filter(cfg, tmp, t, tasks, rate)["splits"]["train"]["bytes"] for t in range(tasks))
    return list(stages.sample_texts(tmp, tasks)), train


def test_tokenizer_sample_is_hash_selected_sized_and_independent_of_tasks(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", 60)
    full = small_config(tmp_path, [str(corpus)], tokenizer={"sample_mb": 1000})
    whole, train_bytes = _sample(tmp_path / "a", full, 1)
    assert sum(len(t.encode()) for t in whole) == train_bytes  # capped by what is there: the whole train split
    half = small_config(tmp_path, [str(corpus)], tokenizer={"sample_mb": train_bytes / 2e6})
    one, _ = _sample(tmp_path / "b", half, 1)
    three, _ = _sample(tmp_path / "c", half, 3)
    assert len(three) == len(one) and three == one
    assert 0.3 * train_bytes < sum(len(t.encode()) for t in one) < 0.7 * train_bytes
    assert set(one) < set(whole)


def test_map_tasks_report_rates(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus", 4)
    cfg = small_config(tmp_path, [str(corpus)])
    stages.run_map(tmp_path / "s", stages.plan_groups(cfg.data, {}, 1)[0], 0, 1, (0.8, 0.1, 0.1))
    line = capsys.readouterr().out
    assert "map task 0: 4 documents" in line and "docs/s" in line and "MB/s" in line
    rows = (tmp_path / "s" / "map" / "task-00000.jsonl").read_text().splitlines()
    assert len(rows) == 4 and {"text", "digest", "split"} == set(json.loads(rows[0]))
