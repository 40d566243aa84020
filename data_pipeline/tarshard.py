"""Fast reading of the tar shards ``pack`` writes (ustar with pax headers), with webdataset as the fallback.

Python's streaming ``tarfile`` costs about 0.4 ms a member; shards of short samples hold thousands of members,
so a direct header walk over the bytes already in memory is used, validating every header's checksum.
Anything it does not recognise goes through webdataset's own tar iterator instead.
"""

from __future__ import annotations

import io

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


# The sample index: a sidecar of each shard, written by ``pack`` and listed (with its sha256) in the manifest, that
# lets a reader fetch single samples by byte range and check each one without hashing the shard.
INDEX_SUFFIX = ".index.safetensors"


def index_path(shard_path: str) -> str:
    """``train/shard-000000.tar`` -> ``train/shard-000000.index.safetensors``."""
    return shard_path.removesuffix(".tar") + INDEX_SUFFIX


def write_sample_index(tar_path, out_path) -> int:
    """Index the ``*.tokens.npy`` members of a finished shard: each payload's byte offset and size and its CRC-32.
    Returns the number of samples."""
    import zlib
    from pathlib import Path

    from safetensors.numpy import save_file

    data = Path(tar_path).read_bytes()
    members = [(o, n) for name, o, n in iter_member_offsets(data) if name.endswith(".tokens.npy")]
    rows = [(o, n, zlib.crc32(data[o : o + n])) for o, n in members]
    arrays = {
        "offset": np.array([r[0] for r in rows], dtype=np.int64),
        "size": np.array([r[1] for r in rows], dtype=np.int64),
        "crc32": np.array([r[2] for r in rows], dtype=np.uint32),
    }
    save_file(arrays, str(out_path), metadata={"format": "shardforge-sample-index/1"})
    return len(rows)


def read_sample_index(blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(offsets, sizes, crc32s) of a sample index file's bytes."""
    from safetensors.numpy import load

    arrays = load(blob)
    return arrays["offset"], arrays["size"], arrays["crc32"]


def sample_crc_ok(payload: bytes, crc: int) -> bool:
    import zlib

    return zlib.crc32(payload) == int(crc)
