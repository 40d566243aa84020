"""The ``shardforge`` command line: parse, dispatch, and turn user errors into one line and an exit code.

Each command is a small function taking the parsed arguments; heavy imports happen inside it, so
``shardforge --help`` stays fast. Add a command by adding a parser in ``build_parser`` and a handler.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from core.errors import EXIT_INTEGRITY, EXIT_OK, ConfigError, ShardforgeError


def _load(args: argparse.Namespace):
    from core.config import load_config

    return load_config(args.config, getattr(args, "overrides", []))


def cmd_config_show(args: argparse.Namespace) -> int:
    print(_load(args).to_yaml(), end="")
    return EXIT_OK


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from data_pipeline.manifest import format_table
    from data_pipeline.prepare import prepare_dataset

    cfg = _load(args)
    if args.slurm:
        return _data_prepare_slurm(cfg, args)
    result = prepare_dataset(cfg, overwrite=args.overwrite)
    state = "up to date (same inputs and settings), reused" if result.reused else "prepared"
    print(f"dataset {state}: {result.output_dir}")
    print(format_table(result.manifest))
    return EXIT_OK


def _data_prepare_slurm(cfg, args: argparse.Namespace) -> int:
    from core.errors import DataError
    from data_pipeline.manifest import format_table, read_manifest
    from data_pipeline.prepare import dataset_fingerprint
    from launcher.slurm_data import STAGES, submit_prepare, wait_for_jobs

    if args.tasks is not None:
        cfg.slurm.array_tasks = args.tasks
    work, ids = submit_prepare(cfg, overwrite=args.overwrite)
    for (stage, _), job in zip(STAGES, ids):
        print(f"submitted {stage} as batch job {job}")
    print(f"logs: {work}/logs")
    if not args.wait:
        return EXIT_OK
    wait_for_jobs(ids)
    manifest_file = Path(cfg.data.output_dir) / "manifest.json"
    if not manifest_file.is_file() or read_manifest(cfg.data.output_dir)["fingerprint"] != dataset_fingerprint(cfg):
        raise DataError(f"the Slurm data preparation did not publish {manifest_file}", fix=f"see {work}/logs")
    print(f"dataset prepared: {cfg.data.output_dir}")
    print(format_table(read_manifest(cfg.data.output_dir)))
    return EXIT_OK


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from data_pipeline.manifest import format_table, read_manifest

    print(format_table(read_manifest(args.dir)))
    return EXIT_OK


def cmd_data_verify(args: argparse.Namespace) -> int:
    from data_pipeline.manifest import read_manifest, verify_dataset

    manifest = read_manifest(args.dir)
    n = sum(len(s["shards"]) for s in manifest["splits"].values()) + 1
    return _report(
        verify_dataset(args.dir, manifest),
        f"{{}} of {n} files do not match the manifest in {args.dir}",
        f"OK: {n} files match {args.dir}/manifest.json",
    )


def _report(problems: list[str], error: str, ok: str) -> int:
    """Print one FAIL line per problem and a summary; exit code 3 when anything failed."""
    for p in problems:
        print(f"FAIL {p}")
    if problems:
        print("error: " + error.format(len(problems)), file=sys.stderr)
        return EXIT_INTEGRITY
    print(ok)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from launcher.spawn import run_ranks

    cfg = _load(args)  # fails here, before any rank starts, on a bad config or layout
    return run_ranks("launcher.train", cfg, args.config, args.overrides)


def cmd_finetune(args: argparse.Namespace) -> int:
    from launcher.finetune import check_finetune
    from launcher.spawn import run_ranks

    cfg = _load(args)
    check_finetune(cfg)
    return run_ranks("launcher.train", cfg, args.config, args.overrides)


def cmd_continue(args: argparse.Namespace) -> int:
    from core.config import load_config
    from launcher.finetune import check_finetune
    from launcher.maintain import continue_overrides, gate, report
    from launcher.spawn import run_ranks

    cfg = _load(args)
    extra = continue_overrides(cfg)
    cfg = load_config(args.config, [*args.overrides, *extra])
    check_finetune(cfg)
    rc = run_ranks("launcher.train", cfg, args.config, [*args.overrides, *extra])
    if rc != EXIT_OK:
        return rc
    return report(*gate(cfg, cfg.checkpoint.dir))


def cmd_tensorboard(args: argparse.Namespace) -> int:
    import subprocess

    logdir = args.run_dir
    print(f"TensorBoard on http://{args.host}:{args.port}/ for {logdir} (Ctrl-C stops it)", flush=True)
    return subprocess.call(
        [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, "--host", args.host, "--port", str(args.port)]
    )


def cmd_checkpoint_inspect(args: argparse.Namespace) -> int:
    from training.checkpoint.tools import inspect

    print(inspect(args.dir))
    return EXIT_OK


def cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    from training.checkpoint.format import verify_checkpoint
    from training.checkpoint.reader import resolve

    path = resolve(args.dir)
    return _report(
        verify_checkpoint(path),
        f"checkpoint {path} does not verify ({{}} problems)",
        f"OK: every file of {path} matches its manifest",
    )


def cmd_checkpoint_consolidate(args: argparse.Namespace) -> int:
    from training.checkpoint.tools import consolidate

    out = consolidate(args.dir, args.out, args.merge_lora)
    print(f"wrote {out}/model.safetensors and {out}/config.json")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from launcher.planner import search, summary

    cfg = _load(args)
    gpus = args.gpus or cfg.parallel.nproc
    vocab = cfg.tokenizer.vocab_size
    text, plan = summary(cfg, vocab, args.gpu, gpus, args.mfu, args.price_per_gpu_hour, args.tokens, args.node_gbps)
    print(text)
    if args.search:
        fits, rejected = search(cfg, vocab, args.gpu, gpus, args.mfu)
        tried = len(fits) + sum(rejected.values())
        print(f"\nlayouts that fit on {gpus} x {args.gpu}, fastest first ({len(fits)} of {tried}):")
        print(f"{'tp':>3}{'pp':>4}{'dp':>5}{'zero':>5}{'mb':>4} {'recompute':<10}{'GiB':>7}{'step s':>9}")
        for pl in fits[: args.top]:
            lay = pl.layout
            print(
                f"{lay.tp:>3}{lay.pp:>4}{lay.dp:>5}{lay.zero:>5}{lay.micro_batch:>4} {lay.recompute:<10}"
                f"{pl.memory.total / 2**30:>7.1f}{pl.step_s:>9.3f}"
            )
        print("rejected: " + ", ".join(f"{n} x {why}" for why, n in sorted(rejected.items(), key=lambda x: -x[1])))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from training.inference.evaluate import load_model, run_eval, summary

    cfg = _load(args) if args.config else None
    model = load_model(args.checkpoint, args.data or (cfg.data.output_dir if cfg else None))
    run_dir = Path(cfg.run_dir if cfg else model.cfg.run_dir)
    out = Path(args.out) if args.out else run_dir / "eval" / f"eval_step_{model.step:08d}.json"
    tb = (cfg or model.cfg).logging.tensorboard_dir
    result = run_eval(model, args.tasks, out, tb, args.split, args.max_samples)
    print(summary(result, args.split))
    print(f"wrote {out}")
    return EXIT_OK


def cmd_harness(args: argparse.Namespace) -> int:
    try:
        from training.inference.harness import run_harness
    except ImportError as e:
        raise ConfigError(
            f"the lm-eval harness is not installed ({e})", fix="pip install -c constraints.txt lm-eval (make test does)"
        ) from None
    from lm_eval.utils import make_table

    from training.checkpoint.reader import run_config

    result = run_harness(args.checkpoint, args.tasks, args.include, args.limit, args.data)
    print(make_table(result))
    out = Path(args.out) if args.out else Path(run_config(args.checkpoint)["run_dir"]) / "eval" / "harness.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({k: result[k] for k in ("results", "versions", "n-shot", "config") if k in result},
                              indent=1, default=str))  # fmt: skip
    print(f"wrote {out}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from training.inference.decode import Sampling, generate, stream_text
    from training.inference.evaluate import load_model

    model = load_model(args.checkpoint, args.data)
    s = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    prompt = model.sp.encode(args.prompt)
    print(args.prompt, end="", flush=True)
    ids = generate(model.decoder, prompt, model.vocab, s, stop=model.sp.eos_id())
    stream_text(ids, model.sp.decode, lambda t: print(t, end="", flush=True))
    print()
    return EXIT_OK


def cmd_export_hf(args: argparse.Namespace) -> int:
    from training.hf.llama import export_hf

    out = export_hf(args.checkpoint, args.out, args.data, args.overwrite)
    print(f"wrote a Hugging Face Llama model to {out} (load it with transformers.AutoModelForCausalLM)")
    return EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from training.inference.compress import quantize

    r = quantize(args.checkpoint, args.out, args.mode, args.data, args.max_samples, overwrite=args.overwrite)
    o, q = r["original"], r["quantized"]
    print(f"int8 {r['mode']}: {r['int8_file_bytes'] / 1e6:.2f} MB on disk vs {r['fp32_bytes'] / 1e6:.2f} MB fp32")
    print(f"  perplexity {q['perplexity']:.3f} vs {o['perplexity']:.3f} (ratio {r['perplexity_ratio']:.4f})")
    print(f"  generation {q['generate_tokens_per_s']:.1f} vs {o['generate_tokens_per_s']:.1f} tokens/s "
          f"(x{r['speedup']:.2f}); wrote {args.out}")  # fmt: skip
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    from training.inference.compress import prune

    r = prune(args.checkpoint, args.out, args.sparsity, args.nm, args.data, args.max_samples, args.overwrite)
    print(f"pruned {r['pruned_matrices']} matrices ({r['method']}): sparsity {r['sparsity']:.4f}")
    print(f"  perplexity {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f}; wrote {args.out}")
    print(f"  recover: shardforge finetune -c FILE model.init_from=ckpt:{args.out} train.keep_sparsity=true")
    return EXIT_OK


def _add_compress_parsers(sub) -> None:
    for name, func, text in [
        ("quantize", cmd_quantize, "int8 for CPU serving; size, tokens/s and perplexity beside the original"),
        ("prune", cmd_prune, "magnitude pruning (unstructured or N:M); sparsity and perplexity before and after"),
    ]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--data", help="dataset folder (default: the checkpoint's config)")
        p.add_argument("--max-samples", type=int, default=None, help="test samples for the perplexity")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
        p.set_defaults(func=func)
        if name == "quantize":
            p.add_argument("--mode", choices=["dynamic", "weight-only"], default="dynamic")
        else:
            p.add_argument("--sparsity", type=float, help="unstructured: share of each matrix set to zero")
            p.add_argument("--nm", help="structured N:M, e.g. 2:4")


def _add_model_parsers(sub) -> None:
    p = sub.add_parser("eval", help="test-split loss, perplexity, bits per byte and multiple-choice tasks")
    _add_config_args(p, required=False)
    p.add_argument("--checkpoint", required=True, help="a step_N folder or a checkpoint root (its latest)")
    p.add_argument("--data", help="dataset folder (default: the config's data.output_dir)")
    p.add_argument("--tasks", nargs="*", default=[], help="multiple-choice JSONL files (context, choices, answer)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N samples")
    p.add_argument("--out", help="result JSON (default: RUN_DIR/eval/eval_step_N.json)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("harness", help="run lm-eval harness tasks on a checkpoint (model 'shardforge')")
    p.add_argument("--checkpoint", required=True, help="a step_N folder, a checkpoint root or a consolidated folder")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    p.add_argument("--include", help="a folder of lm-eval task YAMLs (then only those are indexed)")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--data", help="dataset folder holding the tokenizer (default: the checkpoint's config)")
    p.add_argument("--out", help="result JSON (default: RUN_DIR/eval/harness.json)")
    p.set_defaults(func=cmd_harness)
    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache, streamed)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--data", help="dataset folder holding the tokenizer (default: the checkpoint's config)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    exp = sub.add_parser("export", help="export a checkpoint to another format").add_subparsers(
        dest="sub", metavar="FORMAT", required=True
    )
    p = exp.add_parser("hf", help="a Hugging Face Llama folder: config.json, safetensors, tokenizer")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data", help="dataset folder holding the tokenizer (default: the checkpoint's config)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_export_hf)


_SLURM_FLAGS = ("nodes", "gpus_per_node", "time", "partition", "account", "qos", "job_name", "launch")


def _slurm_config(args: argparse.Namespace):
    """The config with the command line's --nodes/--time/... applied as slurm.* overrides."""
    from core.config import load_config

    extra = [f"slurm.{k}={getattr(args, k)}" for k in _SLURM_FLAGS if getattr(args, k) is not None]
    return load_config(args.config, [*args.overrides, *extra])


def cmd_slurm_script(args: argparse.Namespace) -> int:
    from launcher.slurm import prepare_job, render

    cfg = _slurm_config(args)
    print(render(prepare_job(cfg, requeue=args.chain <= 1)), end="")
    return EXIT_OK


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from launcher.slurm import submit

    script, ids = submit(_slurm_config(args), chain=args.chain)
    print(f"wrote {script}")
    for i in ids:
        print(f"submitted batch job {i}")
    return EXIT_OK


def cmd_slurm_status(args: argparse.Namespace) -> int:
    from launcher.slurm import status

    print(status(args.run_dir))
    return EXIT_OK


def _add_slurm_parsers(sub) -> None:
    slurm = sub.add_parser("slurm", help="write, submit and follow Slurm batch jobs").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True
    )
    for name, func, text in [
        ("script", cmd_slurm_script, "print the sbatch script for a config"),
        ("submit", cmd_slurm_submit, "write the script into RUN_DIR/slurm/ and submit it; prints the job id"),
    ]:
        p = slurm.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("--nodes", type=int, help="slurm.nodes")
        p.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, help="slurm.gpus_per_node")
        p.add_argument("--time", help="slurm.time, e.g. 04:00:00")
        p.add_argument("--partition", help="slurm.partition")
        p.add_argument("--account", help="slurm.account")
        p.add_argument("--qos", help="slurm.qos")
        p.add_argument("--job-name", dest="job_name", help="slurm.job_name")
        p.add_argument("--launch", choices=["srun", "torchrun"], help="slurm.launch")
        p.add_argument("--chain", type=int, default=1, help="submit K jobs chained with afterany instead of requeue")
        p.set_defaults(func=func)
    p = slurm.add_parser("status", help="the run's jobs, states, restarts, last step and loss")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_slurm_status)


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, help="run config YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardforge", description="Raw text to a trained, evaluated, deployable language model."
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show third-party notices too (or set SHARDFORGE_VERBOSE=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cfg = sub.add_parser("config", help="show the resolved run config").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True
    )
    p = cfg.add_parser("show", help="print the config after defaults and overrides")
    _add_config_args(p)
    p.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="prepare, inspect and verify datasets").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True
    )
    p = data.add_parser("prepare", help="ingest, clean, dedup, tokenize and shard a corpus")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in data.output_dir")
    p.add_argument("--slurm", action="store_true", help="run the stages as Slurm jobs (job arrays, global dedup)")
    p.add_argument("--tasks", type=int, default=None, help="with --slurm: array tasks (slurm.array_tasks)")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the jobs and print the manifest")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("inspect", help="print a prepared dataset's manifest as a table")
    p.add_argument("dir", help="dataset directory holding manifest.json")
    p.set_defaults(func=cmd_data_inspect)
    p = data.add_parser("verify", help="re-check every shard's and the tokenizer's sha256")
    p.add_argument("dir", help="dataset directory holding manifest.json")
    p.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("train", help="train a model (spawns parallel.nproc local ranks)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="train from model.init_from (a checkpoint or a Hugging Face model)")
    _add_config_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("continue", help="continued training of maintain.previous on new data, regression-gated")
    _add_config_args(p)
    p.set_defaults(func=cmd_continue)

    ck = sub.add_parser("checkpoint", help="inspect, verify and consolidate checkpoints").add_subparsers(
        dest="sub", metavar="SUBCOMMAND", required=True
    )
    p = ck.add_parser("inspect", help="step, layout, sizes and verification of a checkpoint")
    p.add_argument("dir", help="a step_N folder, or a checkpoint root (uses its latest)")
    p.set_defaults(func=cmd_checkpoint_inspect)
    p = ck.add_parser("verify", help="re-check every file of a checkpoint against its manifest")
    p.add_argument("dir")
    p.set_defaults(func=cmd_checkpoint_verify)
    p = ck.add_parser("consolidate", help="write one fp32 safetensors file of full weights plus the config")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA adapters into the base weights")
    p.set_defaults(func=cmd_checkpoint_consolidate)

    p = sub.add_parser("plan", help="estimate memory per device, step time, GPU-hours and cost before running")
    _add_config_args(p)
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100", "cpu"], help="device kind")
    p.add_argument("--gpus", type=int, default=None, help="number of devices (default: parallel.nproc)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, help="price of one device-hour")
    p.add_argument("--tokens", type=float, default=None, help="training tokens (default: 20 per parameter)")
    p.add_argument("--node-gbps", type=float, default=2.0, help="storage GB/s per node for checkpoint I/O (default 2)")
    p.add_argument("--search", action="store_true", help="list every layout that fits, fastest first")
    p.add_argument("--top", type=int, default=10, help="how many layouts --search lists")
    p.set_defaults(func=cmd_plan)

    _add_slurm_parsers(sub)
    _add_model_parsers(sub)
    _add_compress_parsers(sub)

    p = sub.add_parser("tensorboard", help="start TensorBoard on localhost for a run directory")
    p.add_argument("run_dir", help="run directory (or its tensorboard/ folder)")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.set_defaults(func=cmd_tensorboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    from launcher.quiet import VERBOSE_ENV, quiet_third_party

    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # local ranks inherit it
    quiet_third_party()
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except ShardforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
