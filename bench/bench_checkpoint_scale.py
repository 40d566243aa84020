"""Checkpoint I/O spread over ranks (issue #15), measured with real gloo ranks, DeepSpeed and megatron-core.

A 16-layer hidden-512 GPT (about 51M parameters; fp32 masters plus AdamW's two moments, about 0.6 GB per
checkpoint) is saved and loaded on world 1, 2, 4 and 8 (DP only, TP2 x DP2, PP2 x DP2; ZeRO 1 and 3), then
loaded onto other layouts. Each rank reports its own bytes written and read (``/proc/self/io`` deltas around the
save or the load) and times; rank 0 its serial publish seconds. Baselines from the same run: each rank's ideal
share (checkpoint bytes / world), the bytes a format-1 writer wrote (a whole TP x PP slice, every DP rank but
the first idle), ``dd`` with fsync of the same bytes, the synchronous save beside the asynchronous one, and
torch.distributed.checkpoint (DCP) saving and loading the same per-rank tensors.

Usage: python bench/bench_checkpoint_scale.py   (about 6 minutes here; writes bench/results/checkpoint_scale.json)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VOCAB = 512
MODEL = ["model.num_layers=16", "model.hidden_size=512", "model.num_attention_heads=8",
         "model.ffn_hidden_size=2048", "data.seq_length=64", "train.micro_batch_size=1"]  # fmt: skip


def io_counters() -> dict[str, int]:
    lines = Path("/proc/self/io").read_text().split("\n")
    return {k: int(v) for k, v in (line.split(": ") for line in lines if line)}


class Counter:
    """The trainer state a checkpoint needs (its step)."""

    def __init__(self):
        self.step = 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def worker(mode: str, ckpt_dir: str, out: str, overrides: list[str]) -> None:
    """One rank: build the engine for its layout, train one step (the optimizer states exist), then ``save``
    (sync and async, and DCP) or ``load``."""
    from launcher.quiet import quiet_third_party

    quiet_third_party()
    from core.config import load_config
    from parallelism.engine import build_engine
    from parallelism.layout import init_distributed, seed_all, shutdown
    from training.checkpoint.manager import CheckpointManager
    from training.model.parts import model_parts
    from training.optim import WarmupDecaySchedule, build_optimizer

    over = [*MODEL, *overrides, f"checkpoint.dir={ckpt_dir}", "checkpoint.keep_last=10"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", over)
    layout = init_distributed(cfg.parallel)
    seed_all(cfg.train.seed)
    engine = build_engine(model_parts(cfg, VOCAB), layout, cfg, lambda m: build_optimizer(m, cfg.optim),
                          lambda o: WarmupDecaySchedule(o, cfg.optim, 10))  # fmt: skip
    import torch

    tokens = torch.randint(0, VOCAB, (cfg.train.micro_batch_size, cfg.data.seq_length + 1))
    engine.train_step([tokens] * (cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp)))
    manager = CheckpointManager(cfg, layout, log=lambda *a, **k: None)
    stateful = {"trainer": Counter()}
    report = {"rank": layout.rank, "world": layout.world}
    try:
        if mode == "save":
            for step, label in ((1, "sync"), (2, "async")):
                manager.cfg.checkpoint.async_save = label == "async"
                before = io_counters()
                manager.save(step, engine, stateful)
                blocked = manager.saves[-1]["blocked_seconds"]
                manager.wait()
                after = io_counters()  # write_bytes: what reached the storage layer (sockets excluded)
                report[label] = {**manager.saves[-1], "blocked_seconds": blocked,
                                 "write_bytes": after["write_bytes"] - before["write_bytes"]}  # fmt: skip
            report["dcp"] = dcp_round_trip(engine, cfg, layout, Path(ckpt_dir).parent / "dcp")
        else:
            before = io_counters()
            started = time.perf_counter()
            manager.resume(engine, stateful)
            seconds, rchar = time.perf_counter() - started, io_counters()["rchar"] - before["rchar"]
            report["load"] = {"seconds": seconds, "rchar": rchar, "model_bytes_read": manager.read_bytes}
    finally:
        Path(out).write_text(json.dumps(report))
        shutdown()


def dcp_round_trip(engine, cfg, layout, folder: Path) -> dict:
    """torch.distributed.checkpoint saving and loading this rank's share of the same tensors (the engine
    question of the issue: the same bytes through DCP's writer)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from training.checkpoint import shards

    tensors, _ = shards.local_share(engine.ds, cfg.optim.name, layout.dp, layout.dp_rank)
    state = {f"r{layout.rank}/{k}": v for k, v in tensors.items()}
    dist.barrier()
    started = time.perf_counter()
    dcp.save(state, checkpoint_id=str(folder))
    dist.barrier()
    saved = time.perf_counter() - started
    target = {k: v.clone().zero_() for k, v in state.items()}
    started = time.perf_counter()
    dcp.load(target, checkpoint_id=str(folder))
    dist.barrier()
    return {"save_seconds": saved, "load_seconds": time.perf_counter() - started,
            "bytes": sum(v.numel() * 4 for v in state.values())}  # fmt: skip


def layout_args(tp=1, pp=1, dp=1, zero=1) -> list[str]:
    return [f"parallel.nproc={tp * pp * dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero_stage={zero}"]


def run_ranks(mode: str, ckpt: Path, lay: dict, tag: str, work: Path) -> list[dict]:
    from core.net import free_port

    world = lay["tp"] * lay["pp"] * lay["dp"]
    over = layout_args(lay["tp"], lay["pp"], lay["dp"], lay["zero"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}  # fmt: skip
    outs = [work / f"{tag}-{mode}-rank{r}.json" for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, str(ckpt), str(outs[r]), *over],
            cwd=REPO,
            env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for r in range(world)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"{tag} {mode}: a rank failed")
    return [json.loads(o.read_text()) for o in outs]


def dd(src: str, dst: str, nbytes: int, fsync: bool) -> float:
    started = time.perf_counter()
    extra = ["conv=fsync"] if fsync else []
    subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={max(1, nbytes >> 20)}", *extra],
                   check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def checkpoint_bytes(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    files = manifest["files"]
    model = {k: v["bytes"] for k, v in files.items() if k.startswith("model/") and k.endswith(".safetensors")}
    return {"total": sum(v["bytes"] for v in files.values()), "model": model}


def slice_bytes(model_files: dict) -> int:
    """The largest TP x PP slice: what one format-1 writer (DP rank 0 of the slice) wrote alone."""
    slices: dict[str, int] = {}
    for name, n in model_files.items():
        key = name.rsplit("_dp", 1)[0]
        slices[key] = slices.get(key, 0) + n
    return max(slices.values())


SAVE_LAYOUTS = {
    "dp1": {"tp": 1, "pp": 1, "dp": 1, "zero": 1},
    "dp2": {"tp": 1, "pp": 1, "dp": 2, "zero": 1},
    "dp4": {"tp": 1, "pp": 1, "dp": 4, "zero": 1},
    "dp8": {"tp": 1, "pp": 1, "dp": 8, "zero": 1},
    "dp2-zero3": {"tp": 1, "pp": 1, "dp": 2, "zero": 3},
    "dp4-zero3": {"tp": 1, "pp": 1, "dp": 4, "zero": 3},
    "tp2dp2": {"tp": 2, "pp": 1, "dp": 2, "zero": 1},
    "pp2dp2": {"tp": 1, "pp": 2, "dp": 2, "zero": 1},
}
CROSS = [("dp4", "tp2dp2"), ("dp4", "pp2dp2"), ("dp8", "dp2"), ("tp2dp2", "dp4"), ("pp2dp2", "dp1")]


def main() -> None:
    from bench.common import write_result

    work = Path(tempfile.mkdtemp(prefix="ckpt-scale-"))
    results, folders = {}, {}
    try:
        for tag, lay in SAVE_LAYOUTS.items():
            ckpt = work / tag / "checkpoints"
            saves = run_ranks("save", ckpt, lay, tag, work)
            folders[tag] = ckpt / "step_00000001"
            sizes = checkpoint_bytes(folders[tag])
            loads = run_ranks("load", ckpt, lay, tag, work)  # same layout (resumes from step 2: the async save)
            world = len(saves)
            written = [r["sync"]["bytes_this_rank"] for r in saves]
            storage = [r["sync"]["write_bytes"] for r in saves]
            share = sizes["total"] / world
            own = [sizes["model"][f"model/tp{t}_pp{p}_dp{d}.safetensors"]
                   for p in range(lay["pp"]) for d in range(lay["dp"]) for t in range(lay["tp"])]  # fmt: skip
            read = [r["load"]["model_bytes_read"] for r in loads]
            rank0 = saves[0]["sync"]
            mb = sizes["total"] / 1e6
            write_s, read_s = dd("/dev/zero", str(work / "dd.bin"), sizes["total"], True), None
            read_s = dd(str(work / "dd.bin"), "/dev/null", sizes["total"], False)
            (work / "dd.bin").unlink()
            save_s = max(r["sync"]["seconds"] for r in saves)
            load_s = max(r["load"]["seconds"] for r in loads)
            results[tag] = {
                "layout": lay,
                "checkpoint_mb": round(mb, 1),
                "written_mb_per_rank": [round(w / 1e6, 2) for w in written],
                "storage_write_mb_per_rank": [round(w / 1e6, 2) for w in storage],
                "ideal_share_mb": round(share / 1e6, 2),
                "write_max_over_mean": round(max(written) / (sum(written) / world), 3),
                "format1_writer_mb": round(slice_bytes(sizes["model"]) / 1e6, 2),
                "rank0_publish_s": round(rank0["publish_seconds"], 4),
                "save_s": round(save_s, 3),
                "rank0_publish_share_of_save": round(rank0["publish_seconds"] / save_s, 4),
                "same_layout_read_over_own_share": round(max(r / o for r, o in zip(read, own)), 3),
                "save_mb_per_s": round(mb / save_s, 1),
                "dd_fsync_write_mb_per_s": round(mb / write_s, 1),
                "save_vs_dd": round(write_s / save_s, 3),
                "load_mb_per_s": round(mb / load_s, 1),
                "dd_read_mb_per_s": round(mb / read_s, 1),
                "load_vs_dd": round(read_s / load_s, 3),
                "sync_blocked_s": round(max(r["sync"]["blocked_seconds"] for r in saves), 3),
                "async_blocked_s": round(max(r["async"]["blocked_seconds"] for r in saves), 3),
                "async_blocked_share_of_sync": round(
                    max(r["async"]["blocked_seconds"] for r in saves)
                    / max(r["sync"]["blocked_seconds"] for r in saves),
                    3,
                ),
                "dcp_save_s": round(max(r["dcp"]["save_seconds"] for r in saves), 3),
                "dcp_load_s": round(max(r["dcp"]["load_seconds"] for r in saves), 3),
                "shardforge_write_s_same_bytes": round(max(r["sync"]["write_seconds"] for r in saves), 3),
            }
            print(tag, json.dumps(results[tag]), flush=True)
        for source, target in CROSS:
            lay = SAVE_LAYOUTS.get(target) or {"tp": 1, "pp": 1, "dp": int(target[2:]), "zero": 1}
            ckpt = work / f"{source}-to-{target}" / "checkpoints"
            shutil.copytree(folders[source], ckpt / "step_00000001")
            (ckpt / "latest").write_text("step_00000001\n")
            loads = run_ranks("load", ckpt, lay, f"{source}-to-{target}", work)
            total_model = sum(checkpoint_bytes(folders[source])["model"].values())
            new_share = total_model / len(loads)  # every new rank holds 1/world of the (TP x PP x DP) state
            read = [r["load"]["model_bytes_read"] for r in loads]
            results[f"{source}->{target}"] = {
                "read_mb_per_rank": [round(r / 1e6, 2) for r in read],
                "new_share_mb": round(new_share / 1e6, 2),
                "read_max_over_new_share": round(max(read) / new_share, 3),
            }
            print(source, "->", target, json.dumps(results[f"{source}->{target}"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_result("checkpoint_scale", {"parameters": "about 51M (16 x 512, ffn 2048, vocab 512)", "layouts": results,
                                      "notes": __doc__.split("\n\n")[1].replace("\n", " ")})  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        main()
