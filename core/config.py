"""Typed run configuration: one YAML file per run, one section per component.

Leaf module: imports nothing from the project except ``core.errors``. Every section is a pydantic model
that forbids unknown keys; :func:`load_config` reads a YAML file, applies dotted ``key=value`` overrides,
substitutes ``${run_dir}`` and validates everything before any work starts. Configs hold values only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError


class Section(BaseModel):
    """Base for every config section: unknown keys and silent type coercions are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=False)


class DataConfig(Section):
    inputs: list[str] = Field(default_factory=list)
    """Files, directories or globs. Empty: the built-in default corpus (this Python's standard library)."""
    output_dir: str = "${run_dir}/data"
    """Where shards, tokenizer and manifest.json go."""
    seq_length: int = Field(256, ge=8)
    """Tokens per training sample; each packed sample holds seq_length + 1 tokens."""
    split: tuple[float, float, float] = (0.98, 0.01, 0.01)
    """Fractions for train/validation/test, assigned by a hash of each document's content."""
    extensions: list[str] = Field(
        default_factory=lambda: [".txt", ".md", ".py", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet"]
    )
    """File suffixes picked up when an input is a directory."""
    validation_inputs: list[str] = Field(default_factory=list)
    """Files, directories or globs holding the validation split (as Megatron's separate valid data path): every
    document of them goes to validation, the training inputs' hash share of validation goes to train, and training
    documents with the same content (or near-duplicates, with ``dedup_near``) are left out. Empty: validation is
    the hash-assigned share of ``inputs``."""
    test_inputs: list[str] = Field(default_factory=list)
    """The same for the test split."""
    text_field: str = "text"
    """Field holding the text in JSONL records, and the string column holding it in parquet files."""
    on_invalid_utf8: Literal["skip", "fail"] = "skip"
    """A file that is not valid UTF-8: count and skip it, or stop with an error."""
    on_missing_field: Literal["skip", "fail"] = "fail"
    """A JSONL record without ``text_field`` (or not a JSON object): count and skip it, or stop."""
    max_documents: int | None = Field(None, ge=1)
    """Read at most this many documents (after sorting inputs), for quick trials."""
    min_chars: int = Field(32, ge=0)
    """Documents shorter than this (after cleaning) are dropped."""
    max_chars: int = Field(1_000_000, ge=1)
    """Documents longer than this are dropped."""
    max_symbol_ratio: float = Field(0.5, gt=0, le=1)
    """Drop a document whose share of characters that are neither alphanumeric nor whitespace exceeds this."""
    min_alnum_ratio: float = Field(0.25, ge=0, le=1)
    """Drop a document whose share of alphanumeric characters is below this."""
    max_repeated_line_frac: float = Field(0.5, gt=0, le=1)
    """Drop a document whose non-blank lines are duplicates of earlier lines more often than this."""
    dedup_exact: bool = True
    """Drop documents whose normalized text was seen before."""
    dedup_near: bool = True
    """Drop near-duplicates found with MinHash LSH (datasketch)."""
    minhash_threshold: float = Field(0.8, gt=0, lt=1)
    """Estimated Jaccard similarity of word 5-grams above which two documents are near-duplicates."""
    minhash_num_perm: int = Field(128, ge=16)
    """Number of MinHash permutations."""
    minhash_ngram: int = Field(5, ge=1)
    """Word n-gram size used for MinHash shingles."""
    shard_size_mb: float = Field(16.0, gt=0)
    """Target size of one webdataset tar shard."""
    num_workers: int = Field(2, ge=1)
    """Worker processes that tokenize."""
    seed: int = 1234
    """Seed for tokenizer sampling."""
    format: Literal["text", "sft"] = "text"
    """text: raw documents (pretraining); sft: prompt/response JSONL, loss only on the response tokens."""
    prompt_field: str = "prompt"
    """sft: the JSONL field holding the prompt."""
    response_field: str = "response"
    """sft: the JSONL field holding the response."""

    @field_validator("split")
    @classmethod
    def _split_sums_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(f"must be three non-negative fractions summing to 1 with train > 0, got {list(v)}")
        return v


class BlendSource(Section):
    path: str
    """A prepared dataset directory (holding manifest.json)."""
    weight: float = Field(1.0, gt=0)
    """Relative share of samples drawn from it."""


class LoaderConfig(Section):
    blend: list[BlendSource] = Field(default_factory=list)
    """Datasets to mix for training; empty means ``data.output_dir`` alone."""
    shuffle: bool = True
    """Shuffle shard order and samples within each shard, with a new order every epoch."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0: read in the training process)."""
    prefetch: Literal["auto", "on", "off"] = "auto"
    """With ``num_workers: 0``, read the next step's samples in a background thread while the current step runs.
    auto: on where a GPU runs the step (the host thread would wait on the device), off on CPUs (the thread would
    compete with the step's own threads for the cores)."""
    seed: int = 1234
    """Seed of the shuffle; the same seed gives the same sample order."""


class TokenizerConfig(Section):
    vocab_size: int = Field(8000, ge=64)
    """Vocabulary size of the SentencePiece model."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece algorithm."""
    model_file: str | None = None
    """Reuse this existing SentencePiece .model instead of training one."""
    byte_fallback: bool = True
    """Encode unknown characters as bytes instead of <unk>."""
    sample_mb: float = Field(1000.0, gt=0)
    """Megabytes of training-split text used to train the tokenizer (a hash-selected sample; all of it when the
    split is smaller). SentencePiece holds the sample in memory: about 1 GB of text needs several GB of RAM."""
    character_coverage: float = Field(0.9995, gt=0, le=1)
    """Share of characters covered by the vocabulary."""
    user_defined_symbols: list[str] = Field(default_factory=list)
    """Extra special tokens kept whole."""


class ModelConfig(Section):
    arch: Literal["gpt", "lstm", "gru"] = "gpt"
    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(128, ge=8)
    num_attention_heads: int = Field(4, ge=1)
    num_query_groups: int | None = Field(None, ge=1)
    """Grouped-query attention: key/value head groups (None: as many as heads)."""
    ffn_hidden_size: int | None = Field(None, ge=1)
    """None: 4 x hidden_size (GELU) or 8/3 x hidden_size rounded to 64 (SwiGLU)."""
    position_embedding: Literal["rope", "learned"] = "rope"
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    activation: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    """swiglu (Llama), gelu (exact), or gelu_tanh (the tanh approximation of GPT-2's "gelu_new")."""
    bias: bool = False
    """Biases in the blocks' linear layers (q/k/v, attention output, both MLP layers), as GPT-2 has."""
    tie_embeddings: bool = False
    attention: Literal["sdpa", "megatron"] = "sdpa"
    """Core attention: torch's fused scaled_dot_product_attention, or megatron-core's local one."""
    dropout: float = Field(0.0, ge=0, lt=1)
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of every RMSNorm/LayerNorm."""
    rope_base: float = Field(10000.0, gt=0)
    """RoPE base frequency (Hugging Face's rope_theta)."""
    init_std: float = Field(0.02, gt=0)
    init_from: str | None = None
    """Start from other weights: ``hf:DIR`` (a local Hugging Face Llama or GPT-2 folder) or ``ckpt:DIR`` (a Shardforge
    checkpoint, a step_N folder or a root; weights only: a fresh optimizer, schedule and step count)."""

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.arch == "gpt" and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        groups = self.num_query_groups
        if groups is not None and self.num_attention_heads % groups:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={groups}"
            )
        return self


class ParallelConfig(Section):
    nproc: int = Field(1, ge=1)
    """Total ranks (world size)."""
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp: int | None = Field(None, ge=1)
    """None: nproc / (tp * pp)."""
    zero_stage: int = Field(0, ge=0, le=3)
    sequence_parallel: bool = False
    activation_checkpointing: Literal["none", "selective", "full"] = "none"


class OptimConfig(Section):
    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    clip_grad: float = Field(1.0, ge=0)
    """Global gradient-norm clipping threshold (0 disables)."""


class TrainConfig(Section):
    max_steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    global_batch_size: int = Field(8, ge=1)
    eval_interval: int = Field(50, ge=1)
    eval_iters: int = Field(4, ge=1)
    log_interval: int = Field(10, ge=1)
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many validations without improvement (None: never)."""
    early_stopping_min_delta: float = Field(0.0, ge=0)
    """An improvement must lower the validation loss by more than this."""
    max_consecutive_skips: int = Field(5, ge=1)
    """Stop with an error after this many steps in a row with a non-finite loss."""
    keep_sparsity: bool = False
    """Keep the weights that are zero at the start at zero (a recovery fine-tune after pruning): their gradients
    are masked, so AdamW never moves them."""
    exit_interval: int | None = Field(None, ge=1)
    """Checkpoint and exit (code 0) after this many steps of this run, as Megatron's --exit-interval."""


class CheckpointConfig(Section):
    dir: str = "${run_dir}/checkpoints"
    interval: int = Field(50, ge=1)
    resume: str = "auto"
    """``auto`` (newest verified), ``none``, or a checkpoint path."""
    keep_last: int = Field(3, ge=1)
    keep_every: int | None = Field(None, ge=1)
    async_save: bool = False


class LoggingConfig(Section):
    tensorboard_dir: str = "${run_dir}/tensorboard"
    log_interval: int = Field(10, ge=1)
    straggler_share: float = Field(0.2, gt=0)
    """Warn when a rank's busy time a step exceeds the other ranks' median by more than this share..."""
    straggler_intervals: int = Field(3, ge=1)
    """...for this many log intervals in a row."""


class WatchdogConfig(Section):
    """Hang detection: each rank runs under a supervisor process that expects a heartbeat at every step."""

    enabled: bool = True
    step_timeout_s: float = Field(300.0, gt=0)
    """No step finished within this: a hang (keep it below the collective timeouts: 10 min on torch's default
    group, 30 min on megatron's)."""
    phase_timeout_s: float = Field(900.0, gt=0)
    """The same for start-up (imports, init, resume), validation and checkpoint saves."""
    poll_s: float = Field(1.0, gt=0)
    """How often the supervisor looks at the heartbeat."""


class SlurmConfig(Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "01:00:00"
    job_name: str = "shardforge"
    signal_grace_s: int = Field(120, ge=1)
    """Slurm sends SIGUSR1 this many seconds before the time limit; the ranks checkpoint and the job requeues."""
    max_restarts: int = Field(10, ge=0)
    """Requeues allowed after checkpointed preemptions; a job that fails otherwise is never requeued."""
    launch: Literal["srun", "torchrun"] = "srun"
    """srun: one Slurm task per device (ranks from Slurm's variables); torchrun: one torchrun per node."""
    cpus_per_task: int = Field(8, ge=1)
    """CPU cores per task (srun) or per node (torchrun); also OMP_NUM_THREADS."""
    cpu_bind: str = "cores"
    """srun --cpu-bind value."""
    constraint: str | None = None
    exclusive: bool = False
    container_image: str | None = None
    """A pyxis/enroot image: adds srun --container-image (and --container-mounts)."""
    container_mounts: str | None = None
    srun_args: list[str] = Field(default_factory=list)
    """Extra srun arguments, each quoted on its own."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables exported by the batch script."""
    array_tasks: int = Field(4, ge=1)
    """`data prepare --slurm`: how many array tasks share the per-file stages."""

    @field_validator("time", mode="before")
    @classmethod
    def _minutes(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # `--time 30` means 30 minutes


class LoraConfig(Section):
    """LoRA adapters for fine-tuning (rank 0: off). The base weights are frozen; TP=1 and PP=1 only."""

    rank: int = Field(0, ge=0)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] = Field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    """Names of the megatron-core linears that get adapters."""


class MaintainConfig(Section):
    """`shardforge continue`: continued training of a released model on new data, gated by a regression check."""

    previous: str | None = None
    """The released model to continue from (a checkpoint folder or root)."""
    replay_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of training samples drawn from the previous model's data (``loader.blend`` with data.output_dir)."""
    replay_data: str | None = None
    """The old dataset to replay; default: the previous model's data.output_dir."""
    eval_data: str | None = None
    """The fixed evaluation set both models are scored on; default: the replay dataset (its stable test split)."""
    eval_split: Literal["train", "validation", "test"] = "test"
    eval_max_samples: int | None = Field(None, ge=1)
    margin: float = Field(0.01, ge=0)
    """Promote only if new loss <= previous loss x (1 + margin)."""


class RunConfig(Section):
    run_dir: str = "runs/default"
    data: DataConfig = Field(default_factory=DataConfig)
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    maintain: MaintainConfig = Field(default_factory=MaintainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _layout(self) -> RunConfig:
        for problem in layout_problems(self):
            raise ValueError(problem)
        return self

    def resolved_dp(self) -> int:
        p = self.parallel
        return p.dp if p.dp is not None else max(1, p.nproc // (p.tp * p.pp))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def layout_problems(cfg: RunConfig) -> list[str]:
    """Every inconsistency between the model, the parallel layout and the batch sizes, each with its fix."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    dp = cfg.resolved_dp()
    out = []
    if p.tp * p.pp * dp != p.nproc:
        out.append(
            f"parallel.tp={p.tp} x parallel.pp={p.pp} x parallel.dp={dp} = {p.tp * p.pp * dp} "
            f"does not equal parallel.nproc={p.nproc}; make the product equal the world size"
        )
    if m.arch in ("lstm", "gru") and (p.tp > 1 or p.pp > 1):
        out.append(f"model.arch={m.arch} supports only data parallelism; set parallel.tp=1 and parallel.pp=1")
    if m.arch == "gpt" and m.num_attention_heads % p.tp:
        out.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    if m.arch == "gpt" and (m.num_query_groups or m.num_attention_heads) % p.tp:
        out.append(f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}")
    if m.num_layers % p.pp:
        out.append(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    if p.pp > 1 and p.zero_stage > 1:
        out.append(
            f"parallel.zero_stage={p.zero_stage} cannot be combined with parallel.pp={p.pp} "
            "(DeepSpeed's pipeline engine supports ZeRO 0 and 1); use parallel.zero_stage=1"
        )
    if p.sequence_parallel and p.tp == 1:
        out.append("parallel.sequence_parallel=true needs parallel.tp > 1")
    if p.sequence_parallel and m.arch == "gpt" and cfg.data.seq_length % p.tp:
        out.append(f"data.seq_length={cfg.data.seq_length} is not divisible by parallel.tp={p.tp} (sequence parallel)")
    if m.tie_embeddings and p.pp > 1:
        out.append("model.tie_embeddings=true is supported with parallel.pp=1 only; untie or use pp=1")
    if cfg.lora.rank and (p.tp > 1 or p.pp > 1 or m.arch != "gpt"):
        out.append("lora.rank > 0 needs model.arch=gpt, parallel.tp=1 and parallel.pp=1; use data parallelism "
                   "(and ZeRO) with LoRA, or lora.rank=0")  # fmt: skip
    if t.precision == "bf16" and p.zero_stage == 0:
        out.append("train.precision=bf16 needs parallel.zero_stage>=1 (ZeRO-0 would accumulate gradients in bf16)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        out.append(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size} x dp={dp}"
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Loading, overrides, interpolation


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=100`` -> (["train", "max_steps"], 100); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value", fix="write it like train.max_steps=100")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key", fix="write it like train.max_steps=100")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and not raw.startswith(("'", '"')):
        value = raw  # a plain string stays whole: YAML would cut "a #b" at its comment marker
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _interpolate(value: Any, run_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace("${run_dir}", run_dir)
    if isinstance(value, list):
        return [_interpolate(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, run_dir) for k, v in value.items()}
    return value


def _describe(err: dict) -> str:
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'"
    if "value" in kind or kind.endswith("_type") or kind.endswith("_parsing"):
        return f"key '{key}': {err['msg']} (got {err.get('input')!r})"
    return f"key '{key}': {err['msg']}"


def _valid_keys_hint(err: dict) -> str | None:
    """For an unknown key, list the keys its section accepts; other errors carry their fix in the message."""
    if err["type"] == "value_error":
        return None
    if err["type"] != "extra_forbidden":
        return "correct the value"
    node: Any = RunConfig
    for part in err["loc"][:-1]:
        field = node.model_fields.get(str(part)) if hasattr(node, "model_fields") else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return "remove or rename it"
        node = field.annotation
    return "valid keys here: " + ", ".join(node.model_fields)


def validate_config(raw: dict, source: str = "<config>") -> RunConfig:
    """Validate a raw dict (already overridden) into a RunConfig, raising a one-line ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    run_dir = str(raw.get("run_dir", RunConfig.model_fields["run_dir"].default))
    try:
        cfg = RunConfig.model_validate(_interpolate(raw, run_dir))
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        text = msg if err["type"] == "value_error" and not err["loc"] else _describe(err)
        raise ConfigError(f"{source}: {text}{more}", fix=_valid_keys_hint(err)) from None
    # defaults that mention ${run_dir} are interpolated after validation
    return RunConfig.model_validate(_interpolate(cfg.model_dump(mode="json"), cfg.run_dir))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file (or the defaults when ``path`` is None) and apply dotted overrides."""
    raw: Any = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist", fix="pass -c with a YAML file from configs/")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{source}: not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return validate_config(apply_overrides(raw, overrides or []), source)
