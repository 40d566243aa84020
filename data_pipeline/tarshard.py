"""Fast reading of the tar shards ``pack`` writes (ustar with pax headers), with webdataset as the fallback.

Python's streaming ``tarfile`` costs about 0.4 ms a member; shards of short samples hold thousands of members,
so a direct header walk over the bytes already in memory is used, validating every header's checksum.
Anything it does not recognise goes through webdataset's own tar iterator instead.
"""

from __future__ import annotations

import io
import json
import os
import zlib

import numpy as np

BLOCK = 512


class TarFormatError(ValueError):
    pass


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    return stored == sum(header[:148]) + 8 * 32 + sum(header[156:])


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].decode("utf-8").partition("=")
        out[key] = value
        pos += length
    return out


def iter_members(data: bytes):
    """Yield ``(name, payload)`` for each regular file of an uncompressed tar held in memory."""
    for name, start, size in iter_member_offsets(data):
        yield name, data[start : start + size]


def iter_member_offsets(data: bytes):
    """Yield ``(name, payload offset, payload size)`` for each regular file of an uncompressed tar."""
    pos, pending = 0, {}
    while pos + BLOCK <= len(data):
        header = data[pos : pos + BLOCK]
        if header == b"\0" * BLOCK:
            return
        if not _checksum_ok(header):
            raise TarFormatError(f"bad tar header checksum at byte {pos}")
        size = _octal(header[124:136])
        kind = header[156:157]
        payload = data[pos + BLOCK : pos + BLOCK + size]
        if len(payload) != size:
            raise TarFormatError(f"member at byte {pos} is truncated")
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind == b"x":
            pending = _pax(payload)
            continue
        if kind in (b"0", b"\0"):
            name = pending.get("path") or header[:100].split(b"\0", 1)[0].decode("utf-8")
            pending = {}
            yield name, pos - (size + BLOCK - 1) // BLOCK * BLOCK, size
    raise TarFormatError("tar ends without its end-of-archive marker (truncated)")


_HEADERS: dict[bytes, tuple[np.dtype, tuple, int]] = {}


def decode_npy(blob: bytes) -> np.ndarray:
    """Decode a small ``.npy`` payload (no pickles), caching the parsed header."""
    head_len = int.from_bytes(blob[8:10], "little") + 10 if blob[6:7] == b"\x01" else None
    if head_len is None or not blob.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(blob), allow_pickle=False)
    key = blob[:head_len]
    if key not in _HEADERS:
        arr = np.load(io.BytesIO(blob), allow_pickle=False)
        _HEADERS[key] = (arr.dtype, arr.shape, head_len)
        return arr
    dtype, shape, offset = _HEADERS[key]
    return np.frombuffer(blob, dtype=dtype, offset=offset).reshape(shape)


def read_token_samples(data: bytes) -> list[np.ndarray]:
    """All ``*.tokens.npy`` arrays of a shard, in order."""
    try:
        return [decode_npy(p) for name, p in iter_members(data) if name.endswith(".tokens.npy")]
    except TarFormatError:
        raise
    except (ValueError, UnicodeDecodeError):
        pass
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    members = tar_file_iterator(io.BytesIO(data))
    return [np.load(io.BytesIO(m["data"])) for m in members if base_plus_ext(m["fname"])[1] == "tokens.npy"]


# The sample index: a sidecar of each shard, written by ``pack`` and listed (with its sha256) in the manifest. One
# safetensors tensor ``entries`` of shape (samples, 3), int64: each sample's payload byte offset, size and CRC-32.
# A reader fetches the rows it needs by byte range (24 bytes a sample), then the samples themselves, and checks
# each sample against its CRC-32: no shard is hashed at training time, and a damaged index row points at bytes
# that fail their CRC.
INDEX_SUFFIX = ".index.safetensors"
INDEX_ROW = 24


def index_path(shard_path: str) -> str:
    """``train/shard-000000.tar`` -> ``train/shard-000000.index.safetensors``."""
    return shard_path.removesuffix(".tar") + INDEX_SUFFIX


def write_sample_index(tar_path, out_path) -> int:
    """Index the ``*.tokens.npy`` members of a finished shard; returns the number of samples."""
    from pathlib import Path

    from safetensors.numpy import save_file

    data = Path(tar_path).read_bytes()
    members = [(o, n) for name, o, n in iter_member_offsets(data) if name.endswith(".tokens.npy")]
    entries = np.array([(o, n, zlib.crc32(data[o : o + n])) for o, n in members], dtype=np.int64).reshape(-1, 3)
    save_file({"entries": entries}, str(out_path), metadata={"format": "shardforge-sample-index/1"})
    return len(members)


def index_rows_start(fd: int) -> tuple[int, int]:
    """(byte offset of the first index row, number of rows) of an open sample index file."""
    head = os.pread(fd, 8, 0)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = json.loads(os.pread(fd, size, 8)) if 0 < size < 1 << 20 else {}
    entry = header.get("entries", {})
    if entry.get("dtype") != "I64" or len(entry.get("shape", [])) != 2 or entry["shape"][1] != 3:
        raise TarFormatError("not a sample index (no int64 'entries' of shape (samples, 3))")
    return 8 + size + entry["data_offsets"][0], entry["shape"][0]


def read_index_rows(fd: int, start: int, ids) -> np.ndarray:
    """Rows ``ids`` of an open sample index: (len(ids), 3) int64 offset, size, CRC-32."""
    blob = b"".join(os.pread(fd, INDEX_ROW, start + INDEX_ROW * int(j)) for j in ids)
    return np.frombuffer(blob, dtype="<i8").reshape(-1, 3)


def sample_crc_ok(payload: bytes, crc: int) -> bool:
    return zlib.crc32(payload) == int(crc)


def decode_samples(blobs: list[bytes]) -> list[np.ndarray]:
    """``.npy`` payloads of one shape and dtype (a shard's samples) decoded with one header parse."""
    if not blobs:
        return []
    first = decode_npy(blobs[0])
    head = len(blobs[0]) - first.nbytes
    if any(b[:head] != blobs[0][:head] or len(b) != len(blobs[0]) for b in blobs):
        return [decode_npy(b) for b in blobs]
    flat = np.frombuffer(b"".join(b[head:] for b in blobs), dtype=first.dtype)
    return list(flat.reshape(len(blobs), *first.shape))
