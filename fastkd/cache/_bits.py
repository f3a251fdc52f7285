"""Bit packing for the teacher cache: fixed-width streams and monotone bitmaps (docs/cache-format.md).

A stream holds m values of `width` bits, LSB first: value i occupies bits [i w, (i + 1) w) of the
byte string read as one little-endian integer, padded with zeros to a whole group of 8 values
(w bytes). Packing works a group at a time: each of the 8 slots of a group has a fixed byte span
and shift, so it is a few whole-array operations per slot.

A monotone bitmap holds, per row, `count` non-decreasing values 0 <= c_0 <= c_1 <= ... <= top as
a bitmap of count + top bits with a one at bit c_i + i ("stars and bars"): count + top bits
whatever the values, against 8 count bits for bytes of them.

Decoding is the ops unpack_bits and unpack_monotone, dispatched by fastkd/backends.py (C++ in
csrc/cpu/ when fastkd._C is built, else the torch twins in fastkd/reference/).
"""
import torch

from .. import backends
from ..reference.unpack_bits import slots

_CPU = torch.device("cpu")  # shards are read into host memory
MAX_WIDTH = 24  # a value spans at most 4 bytes, so 32-bit words hold it (vocabularies up to 16.7M)


def width_for(count: int) -> int:
    """Bits needed for values 0 .. count - 1 (at least 1)."""
    return max(1, (count - 1).bit_length())


def packed_bytes(m: int, width: int) -> int:
    """Bytes of a packed stream of m values."""
    return -(-m // 8) * width


def monotone_bytes(count: int, top: int) -> int:
    """Bytes per row of a monotone bitmap of `count` values in [0, top]."""
    return -(-(count + top) // 8) if count else 0


def pack(values: torch.Tensor, width: int) -> torch.Tensor:
    """values: integer tensor of m entries in [0, 2**width) -> uint8 [packed_bytes(m, width)]."""
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"width must be in [1, {MAX_WIDTH}] bits, got {width}")
    flat = values.reshape(-1).to(torch.int32)
    m = flat.numel()
    groups = -(-m // 8)
    padded = torch.zeros(groups * 8, dtype=torch.int32)
    padded[:m] = flat
    padded = padded.view(groups, 8)
    out = torch.zeros(groups, width, dtype=torch.int32)
    for j, first, shift, span in slots(width):
        v = padded[:, j] << shift if shift else padded[:, j]
        for i in range(span):
            out[:, first + i] |= (v >> (8 * i)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def pack_monotone(values: torch.Tensor, top: int) -> torch.Tensor:
    """values [n, count] non-decreasing per row, in [0, top] -> uint8 [n, monotone_bytes(count, top)]."""
    n, count = values.shape
    width = monotone_bytes(count, top)
    bits = torch.zeros(n, width * 8, dtype=torch.uint8)
    bits.scatter_(1, values.long() + torch.arange(count), 1)
    return (bits.view(n, width, 8).long() << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack(stream: torch.Tensor, width: int, start: int, stop: int, backend: str = "auto") -> torch.Tensor:
    """Values [start, stop) of a packed stream (uint8, the whole stream) -> int64 [stop - start]."""
    return backends.kernel("unpack_bits", backend, _CPU)(stream, width, start, stop)


def unpack_monotone(bitmap: torch.Tensor, count: int, backend: str = "auto") -> torch.Tensor:
    """bitmap [n, B] uint8 of `count` non-decreasing values per row -> int64 [n, count]."""
    return backends.kernel("unpack_monotone", backend, _CPU)(bitmap, count)
