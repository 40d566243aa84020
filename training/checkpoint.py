"""The checkpoint manager: atomic, verified, layout-independent checkpoints, retention and resume.

A checkpoint is a folder ``step_NNNNNNNN/``::

    manifest.json                 every file's size and sha256, the step and layout (written last)
    trainer.json                  trainer counters, LR schedule, loader position, validation and guard state,
                                  optimizer step, the resolved config and the layout
    model/tp{T}_pp{P}.safetensors the canonical model and optimizer state (training.canonical)
    rng/rank{R}.safetensors       each rank's RNG states

It is written into ``step_N.tmp/`` with every file fsynced, the manifest last, then renamed; the ``latest``
pointer is replaced last, atomically. A crash at any moment leaves the old or the new checkpoint complete.
``checkpoint.resume=auto`` picks the newest checkpoint whose manifest verifies, skipping (and naming) broken ones.
"""

from __future__ import annotations

import hashlib
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
from safetensors.torch import save_file

from launcher.config import RunConfig
from launcher.errors import IntegrityError
from parallelism.layout import Layout
from training import canonical

FORMAT = "shardforge-checkpoint/1"


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))
    _fsync_file(path)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def verify_checkpoint(path: Path) -> list[str]:
    """One line per problem with a checkpoint folder (empty when every file matches its manifest)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return [f"{path}: no manifest.json (incomplete checkpoint)"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        return [f"{manifest_path}: not a valid checkpoint manifest"]
    problems = []
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != meta["bytes"]:
            problems.append(f"{f}: size {f.stat().st_size} != manifest {meta['bytes']}")
        elif _sha256(f) != meta["sha256"]:
            problems.append(f"{f}: sha256 does not match the manifest (corrupt)")
    return problems


def read_manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


class CheckpointManager:
    def __init__(self, cfg: RunConfig, layout: Layout, log=print):
        self.cfg, self.layout, self.log = cfg, layout, log
        self.root = Path(cfg.checkpoint.dir)
        self.gated = cfg.model.activation == "swiglu"
        self.saves: list[dict] = []  # step, bytes, seconds of every save (rank 0)
        self.load_seconds: float | None = None

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
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "model").mkdir(parents=True)
            (tmp / "rng").mkdir()
        dist.barrier()
        keep = lay.dp_rank == 0
        tensors = canonical.gather_canonical(engine.ds, self.cfg.optim.name, keep)
        rng = self._rng_tensors()
        state_text = None
        if lay.rank == 0:
            state = {name: obj.state_dict() for name, obj in stateful.items()}
            state["optimizer_step"] = canonical.optimizer_step_count(engine.ds)
            state["config"] = self.cfg.model_dump(mode="json")
            state["layout"] = self._layout_dict()
            state_text = json.dumps(state, indent=1)
        record = {"step": step, "blocked_seconds": 0.0, "seconds": 0.0, "bytes": 0}

        def write() -> None:
            self._write_files(tmp, tensors if keep else None, rng, state_text)
            if lay.rank == 0:
                self._wait_for_ranks(tmp)
                self._publish(tmp, final, step)
                self._apply_retention()
                record["bytes"] = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
            record["seconds"] = time.perf_counter() - started

        if self.cfg.checkpoint.async_save:
            record["blocked_seconds"] = time.perf_counter() - started
            self._pending = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=False)
            self._pending.start()
        else:
            write()
            dist.barrier()  # published everywhere before anyone goes on
            record["blocked_seconds"] = time.perf_counter() - started
        if lay.rank == 0:
            self.saves.append(record)
        return final

    def wait(self) -> None:
        """Block until the previous asynchronous save (if any) has been written and published."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            pending.join()
            self._pending = None

    def _write_files(self, tmp: Path, tensors: dict | None, rng: dict, state_text: str | None) -> None:
        lay = self.layout
        if tensors is not None:
            path = tmp / "model" / f"tp{lay.tp_rank}_pp{lay.pp_rank}.safetensors"
            canonical.write_canonical(path, tensors, {"tp": str(lay.tp), "pp": str(lay.pp)})
            _fsync_file(path)
        path = tmp / "rng" / f"rank{lay.rank:05d}.safetensors"
        save_file(rng, str(path))
        _fsync_file(path)
        if state_text is not None:
            (tmp / "trainer.json").write_text(state_text)
            _fsync_file(tmp / "trainer.json")
        (tmp / f".done-{lay.rank:05d}").touch()  # a marker, so rank 0 knows this rank's files are complete

    def _wait_for_ranks(self, tmp: Path, timeout_s: float = 3600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(list(tmp.glob(".done-*"))) < self.layout.world:
            if time.monotonic() > deadline:
                raise IntegrityError(f"checkpoint {tmp}: not every rank finished writing within {timeout_s:.0f} s")
            time.sleep(0.02)
        for marker in tmp.glob(".done-*"):
            marker.unlink()

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

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(f.relative_to(tmp))] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        _write_json(
            tmp / "manifest.json", {"format": FORMAT, "step": step, "layout": self._layout_dict(), "files": files}
        )
        for d in (tmp, tmp / "model", tmp / "rng"):
            _fsync_dir(d)
        if final.exists():  # a re-save of the same step (after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        _fsync_file(pointer)
        os.replace(pointer, self.root / "latest")
        _fsync_dir(self.root)

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
    def find_resume(self) -> Path | None:
        """The checkpoint to resume from, or None; only rank 0 reads the disk, then broadcasts the choice."""
        choice = [None]
        if self.layout.rank == 0:
            choice[0] = self._choose()
        dist.broadcast_object_list(choice, src=0)
        return Path(choice[0]) if choice[0] else None

    def _choose(self) -> str | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume != "auto":
            path = Path(resume)
            problems = verify_checkpoint(path)
            if problems:
                raise IntegrityError(
                    f"checkpoint.resume={resume}: {problems[0]}",
                    fix="pick another checkpoint, or checkpoint.resume=auto",
                )
            return str(path)
        candidates = sorted((p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), reverse=True)
        for path in candidates:
            problems = verify_checkpoint(path)
            if not problems:
                return str(path)
            print(f"warning: skipping checkpoint {path}: {problems[0]}", file=sys.stderr, flush=True)
        return None

    def load(self, path: Path, engine, stateful: dict) -> dict:
        """Collective: restore model, optimizer, RNG and every stateful object; return trainer.json."""
        started = time.perf_counter()
        state = json.loads((path / "trainer.json").read_text())
        old = state["layout"]
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
