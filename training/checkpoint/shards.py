"""Format 2 model and optimizer state: every rank writes its own share and reads only the bytes it needs.

Each (TP rank T, PP stage P, DP rank D) writes ``model/tp{T}_pp{P}_dp{D}.safetensors``: for every parameter of its
TP slice and each of its optimizer states (the canonical keys ``param/NAME``, ``exp_avg/NAME``, ...), the flat fp32
elements it holds: its ZeRO-1/2 fragments or ZeRO-3 partition (no gather), or without ZeRO the elements
``[n*D//dp, n*(D+1)//dp)`` (n the slice's element count), so the bytes are spread evenly over all ranks. The
file's metadata ``shares`` (JSON) gives each key's slice shape and element range. The writer hashes the bytes
as it writes them: the file's sha256 and, in the sidecar ``...sums.json``, the sha256 of every ``CHUNK``-byte
chunk, so a reader verifies any byte range it reads.

Loading onto any layout: the ranks of a pipeline stage (its TP x DP ranks) split the bytes that stage needs into
equal contiguous parts; each reads and verifies its part (a few large reads, chunk-aligned), then the owners of
each key's bytes broadcast them in the stage group, every rank reassembles the key's full tensor, cuts its new
TP slice and sets it (collective under ZeRO). Nothing is unpickled.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from core.errors import IntegrityError
from parallelism.tp_plan import shard, split_rule, unshard
from training.checkpoint import canonical

CHUNK = 1 << 20  # bytes per verified chunk


class CorruptCheckpoint(IntegrityError):
    """A checkpoint's bytes do not match their sha256 (raised on every rank together): resume=auto goes on to
    the next older checkpoint."""


def share_bounds(n: int, parts: int, i: int) -> tuple[int, int]:
    return n * i // parts, n * (i + 1) // parts


def file_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    return f"tp{tp_rank}_pp{pp_rank}_dp{dp_rank}.safetensors"


def sums_name(data_name: str) -> str:
    return data_name.removesuffix(".safetensors") + ".sums.json"


# --- writing -----------------------------------------------------------------------------------------------
def local_share(ds_engine, optimizer_name: str, dp: int, dp_rank: int) -> tuple[dict, dict]:
    """What this rank holds of its TP slice of every parameter and optimizer state, copied to host memory with no
    communication (its ZeRO fragments, or its even share of a DP-replicated tensor): the flat fp32 tensors and,
    per key, ``[slice shape, lo, hi]`` (its elements of the flattened slice)."""
    canonical.prepare_optimizer_states(ds_engine, optimizer_name)
    tensors, shares = {}, {}
    for name, p in ds_engine.module.named_parameters():
        shape = list(getattr(p, "ds_shape", p.shape))
        for key in (None, *canonical.OPTIMIZER_KEYS[optimizer_name]):
            piece = canonical.local_piece(p, ds_engine, key, dp, dp_rank)
            if piece is None:
                continue
            lo, flat = piece
            label = f"{key or 'param'}/{name}"
            tensors[label] = flat.detach().to("cpu", torch.float32, copy=True)
            shares[label] = [shape, lo, lo + flat.numel()]
    return tensors, shares


class HashingFile:
    """A file written once, front to back, hashed on the way: the sha256 of the whole file and of each
    ``CHUNK``-byte chunk. ``close()`` fsyncs it and returns its manifest entry."""

    def __init__(self, path: Path):
        self.path, self.f = path, open(path, "wb")
        self.whole, self.chunk, self.filled, self.size = hashlib.sha256(), hashlib.sha256(), 0, 0
        self.sums: list[str] = []

    def write(self, buf) -> None:
        buf = memoryview(buf).cast("B")
        self.whole.update(buf)
        self.f.write(buf)
        self.size += len(buf)
        pos = 0
        while pos < len(buf):
            take = min(CHUNK - self.filled, len(buf) - pos)
            self.chunk.update(buf[pos : pos + take])
            self.filled, pos = self.filled + take, pos + take
            if self.filled == CHUNK:
                self.sums.append(self.chunk.hexdigest())
                self.chunk, self.filled = hashlib.sha256(), 0

    def close(self) -> dict:
        if self.filled:
            self.sums.append(self.chunk.hexdigest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"bytes": self.size, "sha256": self.whole.hexdigest()}


def write_hashed(path: Path, data: bytes) -> dict:
    """Write ``data`` to ``path`` (fsynced), hashing it on the way; return its manifest entry."""
    out = HashingFile(path)
    out.write(data)
    return out.close()


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header of fp32 ``tensors`` laid out in their order (the format: an 8-byte little-endian
    length, JSON padded with spaces to 8 bytes, then the tensors' bytes back to back)."""
    entries, offset = {}, 0
    for key, t in tensors.items():
        entries[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + 4 * t.numel()]}
        offset += 4 * t.numel()
    entries["__metadata__"] = metadata
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_share(folder: Path, name: str, tensors: dict, shares: dict, layout: dict) -> dict[str, dict]:
    """The rank's model file (safetensors, streamed from the tensors' memory: no serialized copy) and its chunk
    sums; returns the manifest entries of both (relative to the checkpoint folder, whose ``model/`` is
    ``folder``)."""
    out = HashingFile(folder / name)
    out.write(safetensors_header(tensors, {"shares": json.dumps(shares), "layout": json.dumps(layout)}))
    for t in tensors.values():
        if t.numel():
            out.write(t.contiguous().numpy())
    entries = {f"model/{name}": out.close()}
    sums_text = json.dumps({"chunk_bytes": CHUNK, "sha256": out.sums}).encode()
    entries[f"model/{sums_name(name)}"] = write_hashed(folder / sums_name(name), sums_text)
    return entries


# --- the index of a checkpoint's model files ------------------------------------------------------------------
@dataclass
class Piece:
    """Elements ``[lo, hi)`` of one old TP slice of a key, stored at bytes ``[start, end)`` of ``file``."""

    file: Path
    lo: int
    hi: int
    start: int
    end: int


@dataclass
class Index:
    """Where every key's old TP slices are: ``slices[key][tp_rank] = (shape, pieces ordered by lo)``."""

    old_tp: int
    slices: dict[str, dict[int, tuple[list[int], list[Piece]]]] = field(default_factory=dict)


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor entries and ``__metadata__``) and where its data begins."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, 8 + size


def build_index(model_dir: Path, old_tp: int) -> Index:
    """The index of a checkpoint's model files, from their headers alone."""
    index = Index(old_tp)
    for path in sorted(model_dir.glob("tp*_pp*_dp*.safetensors")):
        tp_rank = int(path.name[2:].split("_")[0])
        try:
            header, base = read_header(path)
            shares = json.loads(header["__metadata__"]["shares"])
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise CorruptCheckpoint(f"{path}: not a readable model file ({e})") from None
        for key, (shape, lo, hi) in shares.items():
            if header[key]["dtype"] != "F32":
                raise IntegrityError(f"{path}: {key} is {header[key]['dtype']}, not F32")
            a, b = header[key]["data_offsets"]
            entry = index.slices.setdefault(key, {}).setdefault(tp_rank, (shape, []))
            entry[1].append(Piece(path, lo, hi, base + a, base + b))
    for parts in index.slices.values():
        for _, pieces in parts.values():
            pieces.sort(key=lambda piece: piece.lo)
    return index


def needed_slices(index: Index, key: str, gated: bool) -> list[int]:
    """The old TP slices a key's full tensor is made of (one, for a tensor TP does not split)."""
    parts = index.slices[key]
    name = key.split("/", 1)[1]
    dim, _ = split_rule(name, gated)
    if dim is None or index.old_tp == 1:
        return [min(parts)]
    if sorted(parts) != list(range(index.old_tp)):
        raise IntegrityError(f"checkpoint holds {len(parts)} of {index.old_tp} TP slices of '{key}'")
    return sorted(parts)


def stream(index: Index, key: str, gated: bool) -> list[tuple[Piece, int]]:
    """The key's bytes in the order of its full data (old TP slices, each flat): pieces with their element
    offset in that order."""
    out, offset = [], 0
    for tp_rank in needed_slices(index, key, gated):
        shape, pieces = index.slices[key][tp_rank]
        n = int(torch.Size(shape).numel())
        covered = 0
        for piece in pieces:
            if piece.lo != covered:
                raise IntegrityError(f"checkpoint: elements {covered}..{piece.lo} of '{key}' slice {tp_rank} missing")
            out.append((piece, offset + piece.lo))
            covered = piece.hi
        if covered != n:
            raise IntegrityError(f"checkpoint: '{key}' slice {tp_rank} holds {covered} of {n} elements")
        offset += n
    return out


def assemble(index: Index, key: str, data: torch.Tensor, gated: bool) -> torch.Tensor:
    """The full tensor of ``key`` from its flat data (old TP slices one after the other)."""
    slices, offset = [], 0
    for tp_rank in needed_slices(index, key, gated):
        shape = index.slices[key][tp_rank][0]
        n = int(torch.Size(shape).numel())
        slices.append(data[offset : offset + n].view(shape))
        offset += n
    return unshard(key.split("/", 1)[1], slices, gated) if len(slices) > 1 else slices[0]


# --- verified range reads -----------------------------------------------------------------------------------
class ChunkReader:
    """Reads byte ranges of a checkpoint's model files, chunk-aligned, verifying every chunk it reads against
    the writer's sums (the sums file itself against the manifest). Counts the bytes it reads."""

    def __init__(self, folder: Path, manifest_files: dict):
        self.folder, self.manifest_files = folder, manifest_files
        self.sums: dict[Path, list[str]] = {}
        self.recent: dict[tuple[Path, int], bytes] = {}
        self.bytes_read = 0

    def _sums(self, path: Path) -> list[str]:
        if path not in self.sums:
            sums_path = path.with_name(sums_name(path.name))
            raw = sums_path.read_bytes()
            rel = str(sums_path.relative_to(self.folder))
            if hashlib.sha256(raw).hexdigest() != self.manifest_files.get(rel, {}).get("sha256"):
                raise IntegrityError(f"{sums_path}: sha256 does not match the manifest (corrupt)")
            self.bytes_read += len(raw)
            self.sums[path] = json.loads(raw)["sha256"]
        return self.sums[path]

    def read(self, path: Path, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``path``, every chunk they touch verified (the last chunks read are kept,
        so consecutive small ranges do not read a chunk twice)."""
        sums = self._sums(path)
        first, last = start // CHUNK, (end - 1) // CHUNK
        with open(path, "rb") as f:
            data = b"".join(self._chunk(f, path, i, sums) for i in range(first, last + 1))
        return data[start - first * CHUNK : end - first * CHUNK]

    def _chunk(self, f, path: Path, i: int, sums: list[str]) -> bytes:
        cached = self.recent.get((path, i))
        if cached is not None:
            return cached
        chunk = os.pread(f.fileno(), CHUNK, i * CHUNK)
        self.bytes_read += len(chunk)
        if i >= len(sums) or hashlib.sha256(chunk).hexdigest() != sums[i]:
            raise IntegrityError(f"{path}: bytes {i * CHUNK}..{i * CHUNK + len(chunk)} do not match their sha256")
        self.recent[(path, i)] = chunk
        while len(self.recent) > 4:
            self.recent.pop(next(iter(self.recent)))
        return chunk


def _file_order(path: Path) -> tuple[int, int, int]:
    """(stage, DP rank, TP rank) of a model file: the order of its writers' ranks (TP fastest)."""
    t, p, d = (int(part[2:] if part[:2] in ("tp", "pp", "dp") else part) for part in path.stem.split("_"))
    return p, d, t


def plan_reads(index: Index, keys: list[str], gated: bool, parts: int) -> list[list[tuple[str, int, int]]]:
    """Who reads what: the stage's bytes (the pieces of ``keys``, file by file in their writers' rank order)
    split into ``parts`` contiguous parts: one file each when there are as many files as parts (the same layout:
    each rank reads the file it wrote), else of equal size, each boundary moved onto a file boundary within 5% of
    a part. For each part, the (key, first element, end element) ranges of the keys' flat data it covers."""
    pieces = sorted(
        ((_file_order(piece.file), piece.start, key, offset, piece.hi - piece.lo)
         for key in keys for piece, offset in stream(index, key, gated) if piece.hi > piece.lo),
        key=lambda item: (item[0], item[1]),
    )  # fmt: skip
    total = sum(item[4] for item in pieces)
    file_starts, position, last_file = [], 0, None
    for order, _, _, _, n in pieces:
        if order != last_file:
            file_starts.append(position)
            last_file = order
        position += n
    file_starts.append(total)
    if len(file_starts) == parts + 1:  # as many files as readers (the same layout): one whole file each
        bounds = file_starts
    else:
        bounds = []
        for j in range(parts + 1):
            ideal = total * j // parts
            near = min(file_starts, key=lambda f: abs(f - ideal))
            bounds.append(near if abs(near - ideal) <= 0.05 * total / parts else ideal)
    plan: list[list[tuple[str, int, int]]] = [[] for _ in range(parts)]
    position = 0
    for _, _, key, offset, n in pieces:  # only the parts a piece overlaps (70B: ~10^5 pieces x 128 parts)
        for j in range(max(0, bisect.bisect_right(bounds, position) - 1), parts):
            if bounds[j] >= position + n:
                break
            lo, hi = max(bounds[j], position), min(bounds[j + 1], position + n)
            if lo < hi:
                plan[j].append((key, offset + lo - position, offset + hi - position))
        position += n
    return plan


def read_elements(reader: ChunkReader, index: Index, key: str, a: int, b: int, gated: bool) -> torch.Tensor:
    """Elements ``[a, b)`` of a key's flat data, read and verified from the pieces that hold them."""
    out = []
    for piece, offset in stream(index, key, gated):
        lo, hi = max(a, offset), min(b, offset + piece.hi - piece.lo)
        if lo < hi:
            start = piece.start + 4 * (lo - offset)
            raw = reader.read(piece.file, start, start + 4 * (hi - lo))
            out.append(torch.frombuffer(bytearray(raw), dtype=torch.float32))
    return torch.cat(out) if len(out) > 1 else out[0]


# --- loading -----------------------------------------------------------------------------------------------
def load_into(ds_engine, index: Index, reader: ChunkReader, optimizer_name: str, layout, gated: bool) -> None:
    """Set every parameter and optimizer state of this rank from the checkpoint (collective over the stage
    group ``layout.stage_group`` and, under ZeRO, over DP). Reads and verifies this rank's part of the stage's
    bytes first; a failed check anywhere raises on every rank before any state changes."""
    named = list(ds_engine.module.named_parameters())
    keys = [f"{k or 'param'}/{n}" for n, _ in named for k in (None, *canonical.OPTIMIZER_KEYS[optimizer_name])]
    missing = [k.split("/", 1)[1] for k in keys if k.startswith("param/") and k not in index.slices]
    keys = [k for k in keys if k in index.slices]
    group = layout.stage_group
    me, parts = dist.get_rank(group), dist.get_world_size(group)
    plan = plan_reads(index, keys, gated, parts)
    mine, problem = {}, ""
    try:
        for key, a, b in plan[me]:
            mine[(key, a)] = read_elements(reader, index, key, a, b, gated)
    except (IntegrityError, OSError) as e:
        problem = str(e)
    _raise_if_any(problem, layout.device)
    if missing:
        raise IntegrityError(
            f"checkpoint does not fit this model: missing {', '.join(missing[:3])}",
            fix="resume with the model config the checkpoint was saved with",
        )
    owners = {key: [] for key in keys}
    for j, ranges in enumerate(plan):
        for key, a, b in ranges:
            owners[key].append((j, a, b))
    canonical.prepare_optimizer_states(ds_engine, optimizer_name)
    params = dict(named)
    mismatched = []
    for key in keys:
        n = sum(p.hi - p.lo for p, _ in stream(index, key, gated))
        data = torch.empty(n, dtype=torch.float32)
        for j, a, b in owners[key]:
            if j == me:
                data[a:b] = mine.pop((key, a))
            if parts > 1:
                dist.broadcast(data[a:b], src=dist.get_global_rank(group, j), group=group)
        kind, name = key.split("/", 1)
        local = shard(name, assemble(index, key, data, gated), layout.tp, layout.tp_rank, gated)
        p = params[name]
        expected = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(local.shape) != expected:
            mismatched.append(f"{name} {tuple(local.shape)} vs model {expected}")
            continue
        canonical.set_value(p, ds_engine, None if kind == "param" else kind, local)
    if mismatched:
        raise IntegrityError(
            f"checkpoint does not fit this model: {'; '.join(mismatched[:3])}",
            fix="resume with the model config the checkpoint was saved with",
        )


def _raise_if_any(problem: str, device) -> None:
    """Every rank raises (the first rank's problem, by rank) when any rank has one."""
    if not dist.is_initialized():
        if problem:
            raise CorruptCheckpoint(problem)
        return
    flag = torch.tensor([1.0 if problem else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0:
        return
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, problem)
    raise CorruptCheckpoint(next(m for m in messages if m))


def full_tensors(folder: Path, manifest_files: dict, old_tp: int, gated: bool, prefix: str = "param/") -> dict:
    """Every full tensor whose key starts with ``prefix``, in one process (eval, export, consolidate): the
    names without the prefix."""
    index = build_index(folder / "model", old_tp)
    reader = ChunkReader(folder, manifest_files)
    out = {}
    for key in sorted(k for k in index.slices if k.startswith(prefix)):
        n = sum(p.hi - p.lo for p, _ in stream(index, key, gated))
        out[key[len(prefix) :]] = assemble(index, key, read_elements(reader, index, key, 0, n, gated), gated)
    return out
