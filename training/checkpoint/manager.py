"""The checkpoint manager: when and how checkpoints are saved and loaded, retention and resume.

The folder's format is ``training.checkpoint.format``. A checkpoint is written into ``step_N.tmp/`` with every file
fsynced, the manifest last, then renamed; the ``latest`` pointer is replaced last, atomically. A crash at any moment
leaves the old or the new checkpoint complete. ``checkpoint.resume=auto`` picks the newest checkpoint whose manifest
verifies, skipping (and naming) broken ones.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as serialize

from core.config import RunConfig
from core.errors import ConfigError, IntegrityError, StorageError
from core.files import fsync_dir, fsync_file, write_json_atomic
from parallelism.layout import Layout
from training.checkpoint import canonical, shards
from training.checkpoint.format import (
    FORMAT,
    check_checkpoint,
    read_manifest,
    step_dir_name,
    write_manifest,
)


def save_failed(step: int, e: OSError) -> StorageError:
    return StorageError(
        f"the checkpoint of step {step} could not be written: {e}",
        fix="free space or make checkpoint.dir writable; the previous checkpoint and `latest` are unchanged",
    )


class CheckpointManager:
    def __init__(self, cfg: RunConfig, layout: Layout, log=print, data_identity: dict | None = None):
        """``data_identity`` (e.g. the tokenizer's sha256 and the sample length) is saved with every checkpoint
        and must be the same when resuming: a resume continues one run on one dataset."""
        self.cfg, self.layout, self.log = cfg, layout, log
        self.data_identity = data_identity or {}
        self.root = Path(cfg.checkpoint.dir)
        self.gated = cfg.model.activation == "swiglu"
        self.saves: list[dict] = []  # every save: step, seconds (blocked, gather, write, background), bytes
        self.load_seconds: float | None = None
        self.read_bytes: int | None = None  # model-file bytes this rank read (and verified) to resume
        self.damaged: dict[str, str] = {}  # checkpoints whose bytes failed verification while loading

    # --- saving ---------------------------------------------------------------------------------------
    def save(self, step: int, engine, stateful: dict) -> Path:
        """Collective: every rank calls it. The state is copied to memory at once; with
        ``checkpoint.async_save`` the files are written by a background thread while training goes on (the next
        save, and the end of training, wait for it). Returns the final checkpoint path."""
        self.wait()
        started = time.perf_counter()
        lay = self.layout
        final, tmp = self.root / step_dir_name(step), self.root / (step_dir_name(step) + ".tmp")
        if lay.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / "model").mkdir(parents=True)
                (tmp / "rng").mkdir()
            except OSError as e:
                raise save_failed(step, e) from None
        dist.barrier()
        gathered = time.perf_counter()
        tensors, shares = shards.local_share(engine.ds, self.cfg.optim.name, lay.dp, lay.dp_rank)
        rng = self._rng_tensors()
        state_text = None
        if lay.rank == 0:
            state = {name: obj.state_dict() for name, obj in stateful.items()}
            state["optimizer_step"] = canonical.optimizer_step_count(engine.ds)
            state["config"] = self.cfg.model_dump(mode="json")
            state["layout"] = self._layout_dict()
            state["data_identity"] = self.data_identity
            state_text = json.dumps(state, indent=1)
        gathered = time.perf_counter() - gathered
        # "bytes": the whole checkpoint, known to rank 0 (it publishes); every rank has its own "bytes_this_rank"
        record = {"step": step, "blocked_seconds": 0.0, "seconds": 0.0, "bytes": None, "gather_seconds": gathered}

        def write() -> None:
            try:
                written = time.perf_counter()
                files = self._write_files(tmp, tensors, shares, rng, state_text)
                record["write_seconds"], record["bytes_this_rank"] = time.perf_counter() - written, files
                tensors.clear()  # this rank's share: the only copy of the state the save holds
                if lay.rank == 0:
                    entries = self._wait_for_ranks(tmp)
                    published = time.perf_counter()
                    self._publish(tmp, final, step, entries)
                    self._apply_retention()
                    record["publish_seconds"] = time.perf_counter() - published
                    record["bytes"] = sum(meta["bytes"] for meta in entries.values())
            except OSError as e:  # raised in the caller's thread by wait() (async) or right after (sync)
                self._failure = save_failed(step, e)
            record["seconds"] = time.perf_counter() - started
            record["background_seconds"] = record["seconds"] - record["blocked_seconds"] if asynchronous else 0.0

        asynchronous = self.cfg.checkpoint.async_save
        if asynchronous:
            record["blocked_seconds"] = time.perf_counter() - started
            self._pending = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
            self._pending.start()
        else:
            write()
            self._raise_failure()
            dist.barrier()  # published everywhere before anyone goes on
            record["blocked_seconds"] = time.perf_counter() - started
        self.saves.append(record)
        return final

    def wait(self) -> None:
        """Block until the previous asynchronous save (if any) has been written and published."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            pending.join()
            self._pending = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        failure, self._failure = getattr(self, "_failure", None), None
        if failure is not None:
            raise failure

    def _write_files(self, tmp: Path, tensors: dict, shares: dict, rng: dict, state_text: str | None) -> int:
        """This rank's files, each hashed as it is written; the entries go into ``.done-RANK.json`` (written
        last, atomically), from which rank 0 builds the manifest. Returns the bytes this rank wrote."""
        lay = self.layout
        name = shards.file_name(lay.tp_rank, lay.pp_rank, lay.dp_rank)
        entries = shards.write_share(tmp / "model", name, tensors, shares, {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp})
        entries[f"rng/rank{lay.rank:05d}.safetensors"] = shards.write_hashed(
            tmp / "rng" / f"rank{lay.rank:05d}.safetensors", serialize(rng)
        )
        if state_text is not None:
            entries["trainer.json"] = shards.write_hashed(tmp / "trainer.json", state_text.encode())
        write_json_atomic(tmp / f".done-{lay.rank:05d}.json", entries)
        return sum(meta["bytes"] for meta in entries.values())

    def _wait_for_ranks(self, tmp: Path, timeout_s: float = 3600.0) -> dict[str, dict]:
        """Rank 0: wait for every rank's ``.done`` record; return all files' entries (merged, not re-hashed)."""
        deadline = time.monotonic() + timeout_s
        while len(list(tmp.glob(".done-*.json"))) < self.layout.world:
            if time.monotonic() > deadline:
                raise IntegrityError(f"checkpoint {tmp}: not every rank finished writing within {timeout_s:.0f} s")
            time.sleep(0.02)
        entries = {}
        for marker in sorted(tmp.glob(".done-*.json")):
            entries.update(json.loads(marker.read_text()))
            marker.unlink()
        return entries

    def _layout_dict(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "zero_stage": lay.zero_stage, "world": lay.world}

    def _rng_tensors(self) -> dict[str, torch.Tensor]:
        from megatron.core import tensor_parallel

        tensors = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["cuda"] = torch.cuda.get_rng_state().cpu()
        for name, st in tensor_parallel.get_cuda_rng_tracker().get_states().items():
            tensors[f"tracker/{name}"] = st.cpu().clone()
        return tensors

    def _publish(self, tmp: Path, final: Path, step: int, entries: dict[str, dict]) -> None:
        files = dict(sorted(entries.items()))
        write_manifest(tmp, {"format": FORMAT, "step": step, "layout": self._layout_dict(), "files": files})
        for d in (tmp, tmp / "model", tmp / "rng"):
            fsync_dir(d)
        if final.exists():  # a re-save of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        fsync_file(pointer)
        os.replace(pointer, self.root / "latest")
        fsync_dir(self.root)

    def _apply_retention(self) -> None:
        c = self.cfg.checkpoint
        steps = sorted(int(p.name[5:]) for p in self.root.glob("step_*") if p.name[5:].isdigit())
        keep = set(steps[-c.keep_last :])
        if c.keep_every:
            keep |= {s for s in steps if s % c.keep_every == 0}
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / step_dir_name(s), ignore_errors=True)

    # --- finding and loading ----------------------------------------------------------------------------
    def resume(self, engine, stateful: dict) -> Path | None:
        """Collective: load the checkpoint ``checkpoint.resume`` names (``auto``: the newest that passes the cheap
        check and whose bytes verify as the ranks read them, skipping and naming damaged ones); return its path,
        or None for a fresh start."""
        while True:
            path = self.find_resume()
            if path is None:
                return None
            try:
                self.load(path, engine, stateful)
                return path
            except shards.CorruptCheckpoint as e:
                if self.cfg.checkpoint.resume != "auto":
                    raise IntegrityError(f"checkpoint.resume={self.cfg.checkpoint.resume}: {e}") from None
                if self.layout.rank == 0:
                    print(f"warning: skipping checkpoint {path}: {e}", file=sys.stderr, flush=True)
                self.damaged[str(path)] = str(e)

    def find_resume(self) -> Path | None:
        """The checkpoint to resume from, or None; only rank 0 reads the disk, then broadcasts the choice."""
        choice = [None]
        if self.layout.rank == 0:
            try:
                choice[0] = self._choose()
            except IntegrityError as e:
                choice[0] = {"error": str(e)}  # every rank stops with the same one-line error
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], dict):
            raise IntegrityError(choice[0]["error"])
        return Path(choice[0]) if choice[0] else None

    def _choose(self) -> str | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            problems = check_checkpoint(path)
            if problems:
                raise IntegrityError(
                    f"checkpoint.resume={resume}: {problems[0]}",
                    fix="pick another checkpoint, or checkpoint.resume=auto",
                )
            return str(path)
        candidates = sorted((p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), reverse=True)
        damaged, first_problem = self.damaged, None
        for path in candidates:
            problems = [damaged[str(path)]] if str(path) in damaged else check_checkpoint(path)
            if not problems:
                return str(path)
            first_problem = first_problem or problems[0]
            if str(path) not in damaged:  # (a damaged one was named when its load failed)
                print(f"warning: skipping checkpoint {path}: {problems[0]}", file=sys.stderr, flush=True)
        if candidates:  # never a silent fresh start over damaged checkpoints (retention could then delete them)
            raise IntegrityError(
                f"checkpoint.resume=auto: none of the {len(candidates)} checkpoints in {self.root} verifies "
                f"(newest: {first_problem})",
                fix="repair or move them, resume from one with checkpoint.resume=PATH, or start fresh with "
                "checkpoint.resume=none",
            )
        return None

    def load(self, path: Path, engine, stateful: dict) -> dict:
        """Collective: restore model, optimizer, RNG and every stateful object; return trainer.json."""
        started = time.perf_counter()
        state = json.loads((path / "trainer.json").read_text())
        self._check_resumable(path, state)
        old = state["layout"]
        manifest = read_manifest(path)
        if manifest.get("format") == FORMAT:
            index = shards.build_index(path / "model", old["tp"])
            reader = shards.ChunkReader(path, manifest["files"])
            try:
                shards.load_into(engine.ds, index, reader, self.cfg.optim.name, self.layout, self.gated)
            finally:
                self.read_bytes = reader.bytes_read
        else:  # format 1: one file per TP x PP slice (verified whole by the cheap check)
            reader = canonical.CanonicalReader(path / "model", old["tp"])
            canonical.load_canonical(
                engine.ds, reader, self.cfg.optim.name, self.layout.tp, self.layout.tp_rank, self.gated
            )
        canonical.set_optimizer_step_count(engine.ds, state["optimizer_step"])
        for name, obj in stateful.items():
            if name in state:
                obj.load_state_dict(state[name])
        engine.ds.global_steps = state["trainer"]["step"]
        self._load_rng(path / "rng" / f"rank{self.layout.rank:05d}.safetensors")
        same = all(old[k] == v for k, v in self._layout_dict().items())
        self.load_seconds = time.perf_counter() - started
        if self.layout.rank == 0:
            where = (
                "same layout"
                if same
                else f"layout tp={old['tp']} pp={old['pp']} dp={old['dp']} "
                f"zero={old['zero_stage']} -> {self.layout.describe()}"
            )
            self.log(f"resumed from {path} at step {state['trainer']['step']} ({where})", flush=True)
        return state

    def _check_resumable(self, path: Path, state: dict) -> None:
        """Refuse a resume onto other data (tokenizer, sample length); explain a changed batch size."""
        saved = state.get("data_identity") or {}
        for key, value in self.data_identity.items():
            if key in saved and saved[key] != value:
                raise ConfigError(
                    f"checkpoint {path} was trained on data with {key}={saved[key]}, this run's data has {value}",
                    fix=f"resume with the same dataset, or start a new run from its weights with "
                    f"model.init_from=ckpt:{path} (shardforge finetune)",
                )
        old_train, t = state["config"]["train"], self.cfg.train
        changed = [f"train.{k} {old_train[k]} -> {getattr(t, k)}" for k in ("global_batch_size", "micro_batch_size")
                   if old_train.get(k) != getattr(t, k)]  # fmt: skip
        if changed and self.layout.rank == 0:
            position = state.get("loader", {}).get("position")
            self.log(f"note: {', '.join(changed)} since the checkpoint: the data position ({position} samples) and "
                     f"the step count carry on; each step now takes the new batch", flush=True)  # fmt: skip

    def _load_rng(self, path: Path) -> None:
        if not path.is_file():
            return  # a rank that did not exist in the old layout keeps its fresh seed
        from megatron.core import tensor_parallel

        with safe_open(str(path), framework="pt") as st:
            keys = set(st.keys())
            torch.set_rng_state(st.get_tensor("torch"))
            if "cuda" in keys and torch.cuda.is_available():
                torch.cuda.set_rng_state(st.get_tensor("cuda"))
            tracker = {k.split("/", 1)[1]: st.get_tensor(k) for k in keys if k.startswith("tracker/")}
        if tracker:
            tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
