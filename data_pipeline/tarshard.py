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
            yield name, payload
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
