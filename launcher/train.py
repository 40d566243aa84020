"""Per-rank training entry point: parse, build, train, close (``python -m launcher.train -c FILE [k=v ...]``).

``shardforge train`` runs this directly for one process, or spawns ``parallel.nproc`` copies (launcher.spawn);
under ``srun`` each task runs it with its rank taken from Slurm's variables. Exit codes: 0 done, 2 user error,
3 integrity error, 75 checkpointed before the end, after SIGTERM/SIGUSR1 or at ``train.exit_interval``
(please requeue: a Slurm job requeues itself on 75, a ``--chain`` job leaves the rest to the next one).
"""

from __future__ import annotations

from training.preemption import Preemption

PREEMPTION = Preemption()
if __name__ == "__main__":
    PREEMPTION.install()  # before any other import (pydantic's takes ~0.5 s): a signal during start-up is kept

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from core.config import RunConfig, load_config  # noqa: E402
from core.errors import EXIT_REQUEUE, ShardforgeError  # noqa: E402


def _check_data(cfg: RunConfig) -> dict:
    from data_pipeline.sample_stream import check_tokenizer, load_dataset_manifest

    root = cfg.data.output_dir
    manifest = load_dataset_manifest(root)
    if cfg.tokenizer.model_file:
        check_tokenizer(root, cfg.tokenizer.model_file)
    if manifest["seq_length"] != cfg.data.seq_length:
        raise ShardforgeError(
            f"data.seq_length={cfg.data.seq_length} but the shards in {root} hold {manifest['seq_length']}",
            fix=f"set data.seq_length={manifest['seq_length']} or prepare the data again",
        )
    return manifest


def _train_stream(cfg: RunConfig, manifest: dict):
    """The training split of ``data.output_dir``, or the weighted blend of ``loader.blend`` datasets."""
    from data_pipeline.batch_loader import BlendedStream
    from data_pipeline.sample_stream import SampleStream, load_dataset_manifest

    if not cfg.loader.blend:
        return SampleStream(cfg.data.output_dir, "train", seed=cfg.loader.seed, shuffle=cfg.loader.shuffle)
    for src in cfg.loader.blend:
        other = load_dataset_manifest(src.path)
        if other["tokenizer"]["sha256"] != manifest["tokenizer"]["sha256"]:
            raise ShardforgeError(
                f"loader.blend dataset '{src.path}' was tokenized with another tokenizer than {cfg.data.output_dir}",
                fix="prepare every blended dataset with the same tokenizer.model_file",
            )
    streams = [
        SampleStream(s.path, "train", seed=cfg.loader.seed + i, shuffle=cfg.loader.shuffle)
        for i, s in enumerate(cfg.loader.blend)
    ]
    return BlendedStream(streams, [s.weight for s in cfg.loader.blend])


def _loaders(cfg: RunConfig, layout, manifest: dict):
    """This rank's training and validation batches. Only the first pipeline stage (inputs) and the last (labels)
    read tokens; stages between get zeros of the right shape and read nothing. TP ranks of a stage each read their
    own copy of the same rows (by byte range: a few KB a step, from the node's page cache after the first rank),
    which costs less than a broadcast over the TP group every step."""
    from data_pipeline.batch_loader import BatchLoader, TokensNotRead
    from data_pipeline.sample_stream import SampleStream

    t, root = cfg.train, cfg.data.output_dir
    reads = layout.pp_rank in (0, layout.pp - 1)
    stream = _train_stream(cfg, manifest)
    val_stream = SampleStream(root, "validation", seed=cfg.loader.seed, shuffle=False)
    if not reads:
        stream = TokensNotRead(stream, manifest["sample_tokens"])
        val_stream = TokensNotRead(val_stream, manifest["sample_tokens"])
    prefetch = reads and {"on": True, "off": False}.get(cfg.loader.prefetch, layout.device.type == "cuda")
    train = BatchLoader(stream, t.global_batch_size, t.micro_batch_size, layout.dp_rank, layout.dp,
                        cfg.loader.num_workers if reads else 0, prefetch)  # fmt: skip

    def val_batches():
        gbs = t.micro_batch_size * layout.dp * t.eval_iters
        return BatchLoader(val_stream, gbs, t.micro_batch_size, layout.dp_rank, layout.dp).next_step()

    return train, val_batches


def built_options(engine) -> dict:
    """What the built model really uses (not what the config asked for): megatron's sequence parallelism, the
    norm gradients summed over TP for it, activation recompute."""
    mods, params = list(engine.module.modules()), list(engine.module.parameters())
    megatron = next((m.config for m in mods if hasattr(getattr(m, "config", None), "sequence_parallel")), None)
    return {
        "sequence_parallel": bool(megatron is not None and megatron.sequence_parallel),
        "sequence_parallel_params": sum(bool(getattr(p, "sequence_parallel", False)) for p in params),
        "recompute_granularity": getattr(megatron, "recompute_granularity", None),
        "recompute_full_layers": sum(bool(getattr(m, "recompute_full", False)) for m in mods),
    }


def _result(trainer, val, ckpt, resumed_from, layout, manager) -> dict:
    return {
        "steps": trainer.state.step,
        "losses": trainer.losses,
        "grad_norms": trainer.grad_norms,
        "step_times": trainer.step_times,
        "val": val.history,
        "stop_reason": trainer.stop_reason,
        "layout": layout.describe(),
        "built": built_options(trainer.engine),
        "preempted": ckpt.preempted,
        "requeue": ckpt.preempted or ckpt.exited_early,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "start_step": trainer.state.step - len(trainer.losses),
        "checkpoint_saves": manager.saves,
        "checkpoint_load_seconds": manager.load_seconds,
        "checkpoint_read_bytes": manager.read_bytes,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def _monitoring(cfg: RunConfig, layout, tb, say, manager):
    """Goodput (kept by the writing rank) and the per-rank cluster metrics (every rank takes part)."""
    from training.cluster_metrics import ClusterMetrics, Goodput

    lg = cfg.logging
    goodput = Goodput(cfg.run_dir, lg.log_interval, tb, tb is not None)
    last_save = lambda: manager.saves[-1]["blocked_seconds"] if manager.saves else 0.0  # noqa: E731
    cluster = ClusterMetrics(lg.log_interval, layout.device, tb, say, lg.straggler_share, lg.straggler_intervals,
                             last_save)  # fmt: skip
    return goodput, cluster


def build_and_train(cfg: RunConfig) -> dict:
    from parallelism.engine import build_engine
    from parallelism.layout import init_distributed, seed_all, shutdown
    from training.callbacks import Checkpointing, ConsoleLog, Heartbeat, TensorBoardLogger, Throughput, Validation
    from training.checkpoint.manager import CheckpointManager
    from training.hf.init_from import initial_weights
    from training.model.flops import device_peak_flops, training_flops_per_token
    from training.model.parts import model_parts
    from training.optim import WarmupDecaySchedule, build_optimizer
    from training.trainer import Trainer

    layout = init_distributed(cfg.parallel)
    try:
        seed_all(cfg.train.seed)
        manifest = _check_data(cfg)
        vocab = manifest["tokenizer"]["vocab_size"]
        t = cfg.train
        engine = build_engine(
            model_parts(
                cfg, vocab, lambda: initial_weights(cfg.model.init_from, cfg.model, vocab, cfg.data.seq_length)
            ),
            layout,
            cfg,
            build_optimizer=lambda model: build_optimizer(model, cfg.optim),
            build_schedule=lambda opt: WarmupDecaySchedule(opt, cfg.optim, t.max_steps),
        )
        train, val_batches = _loaders(cfg, layout, manifest)
        writer = layout.is_last_stage and layout.tp_rank == 0 and layout.dp_rank == 0
        say = print if writer else None
        _, peak = device_peak_flops(None, t.precision)
        thr = Throughput(training_flops_per_token(cfg.model, vocab, cfg.data.seq_length), peak * layout.world)
        tb = TensorBoardLogger(cfg.logging.tensorboard_dir, cfg.to_yaml(), writer, thr)
        val = Validation(t.eval_interval, val_batches, tb, t.early_stopping_patience, say, t.early_stopping_min_delta)
        trainer = Trainer(
            engine,
            train,
            t.max_steps,
            t.global_batch_size * cfg.data.seq_length,
            t.max_consecutive_skips,
            [ConsoleLog(cfg.logging.log_interval, thr, writer), tb, val],
        )
        identity = {"tokenizer_sha256": manifest["tokenizer"]["sha256"], "sample_tokens": cfg.data.seq_length + 1}
        manager = CheckpointManager(
            cfg, layout, log=print if layout.rank == 0 else (lambda *a, **k: None), data_identity=identity
        )
        stateful = {"trainer": trainer.state, "schedule": engine.ds.lr_scheduler, "loader": train, "validation": val}
        resumed_from = manager.resume(engine, stateful)
        ckpt = Checkpointing(
            manager, engine, stateful, cfg.checkpoint.interval, t.exit_interval, PREEMPTION, device=layout.device
        )
        goodput, cluster = _monitoring(cfg, layout, tb if writer else None, say, manager)
        val.timer = ckpt.timer = goodput.counted
        trainer.callbacks = [Heartbeat(), goodput, cluster, *trainer.callbacks, ckpt]
        if layout.rank == 0:
            n = sum(p.numel() for p in engine.module.parameters())
            print(f"training {cfg.model.arch} on {layout.describe()}; {n:,} parameters on rank 0", flush=True)
        trainer.fit()
        result = _result(trainer, val, ckpt, resumed_from, layout, manager)
        result["goodput"] = goodput.record(trainer.state.step)
        result["straggler_warnings"] = cluster.warnings
        if writer:
            path = Path(cfg.run_dir) / "train_result.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
            final = f"; final validation loss {val.history[-1][1]:.4f}" if val.history else ""
            print(f"done: {trainer.stop_reason}{final}", flush=True)
        _all_ranks_done()  # no rank exits (and makes srun kill the others) before every file is written
        return result
    finally:
        shutdown()


def _all_ranks_done() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _train(cfg: RunConfig) -> int:
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = build_and_train(cfg)
    except ShardforgeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return EXIT_REQUEUE if result["requeue"] else 0


def main(argv: list[str] | None = None, supervised: bool = False) -> int:
    """Train; with ``supervised`` (a rank started as ``python -m launcher.train``) under the hang watchdog."""
    import argparse

    ap = argparse.ArgumentParser(prog="launcher.train")
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ShardforgeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if not (supervised and cfg.watchdog.enabled):
        return _train(cfg)
    from launcher.supervise import supervise

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    return supervise(cfg, rank, lambda: _train(cfg))


if __name__ == "__main__":
    import time

    os.environ.setdefault("SHARDFORGE_T0", str(time.time()))  # this rank's start, for goodput
    from launcher.quiet import quiet_third_party

    quiet_third_party()
    sys.exit(main(supervised=True))
