"""Bit-packing of token ids to ceil(log2 V) bits each (16 for a 49,152 vocabulary, 18 for Qwen2.5's 152k)."""

from __future__ import annotations

import math

import numpy as np

from soaes_core.errors import InvalidArgumentError

_CHUNK = 1 << 20  # ids per chunk, bounding the (ids × bits) temporary


def bits_for_vocab(vocab_size: int) -> int:
    """Bits needed to store any id in [0, vocab_size)."""
    if vocab_size < 1:
        raise InvalidArgumentError(f"vocab_size must be ≥ 1, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_ids(ids: np.ndarray, bits: int) -> bytes:
    """Pack non-negative integer `ids` (any shape, flattened) into a little-endian bit stream of `bits` each."""
    flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise InvalidArgumentError(f"ids must lie in [0, 2^{bits}), got range [{flat.min()}, {flat.max()}]")
    if bits in (8, 16, 32):  # byte-aligned widths: a plain little-endian cast is the packed form
        return flat.astype(f"<u{bits // 8}").tobytes()
    shifts = np.arange(bits, dtype=np.int64)
    out = []
    # chunk boundaries at multiples of 8 ids keep every chunk's bit count a whole number of bytes
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        bitmat = ((part[:, None] >> shifts) & 1).astype(np.uint8)
        out.append(np.packbits(bitmat.reshape(-1), bitorder="little").tobytes())
    return b"".join(out)


def unpack_ids(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_ids`: the first `count` ids as int64."""
    if bits in (8, 16, 32):
        return np.frombuffer(data, dtype=f"<u{bits // 8}", count=count).astype(np.int64)
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = (1 << np.arange(bits, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    bytes_per_chunk = _CHUNK * bits // 8
    for i, start in enumerate(range(0, count, _CHUNK)):
        n = min(_CHUNK, count - start)
        chunk = raw[i * bytes_per_chunk: i * bytes_per_chunk + math.ceil(n * bits / 8)]
        bitmat = np.unpackbits(chunk, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
        out[start:start + n] = bitmat @ weights
    return out
