"""Bit packing for the teacher cache: fixed-width streams and monotone bitmaps (docs/cache-format.md).

A stream holds m values of `width` bits, LSB first: value i occupies bits [i w, (i + 1) w) of the
byte string read as one little-endian integer, padded with zeros to a whole group of 8 values
(w bytes). Packing works a group at a time: each of the 8 slots of a group has a fixed byte span
and shift, so it is a few whole-array operations per slot.

A monotone bitmap holds, per row, `count` non-decreasing values 0 <= c_0 <= c_1 <= ... <= top as
a bitmap of count + top bits with a one at bit c_i + i ("stars and bars"): count + top bits
whatever the values, against 8 count bits for bytes of them.

Decoding (fastkd::unpack_bits, fastkd::unpack_monotone) runs in C++ (csrc/cpu/cache_codec_cpu.cpp)
when fastkd._C is built, else in the torch twins below.
"""
import torch

from .. import backends

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


def _slots(width: int):
    """(slot, first byte, shift, bytes spanned) for the 8 slots of a group."""
    for j in range(8):
        bit = j * width
        yield j, bit // 8, bit % 8, (bit % 8 + width + 7) // 8


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
    for j, first, shift, span in _slots(width):
        v = padded[:, j] << shift if shift else padded[:, j]
        for i in range(span):
            out[:, first + i] |= (v >> (8 * i)) & 0xFF
    return out.to(torch.uint8).reshape(-1)


def _unpack_torch(stream: torch.Tensor, width: int, start: int, stop: int) -> torch.Tensor:
    """Backend "torch" of fastkd::unpack_bits: the groups that hold [start, stop), slot by slot."""
    g0, g1 = start // 8, -(-stop // 8)
    groups = stream[g0 * width:g1 * width].view(g1 - g0, width)
    out = torch.empty(g1 - g0, 8, dtype=torch.int32)
    mask = (1 << width) - 1
    for j, first, shift, span in _slots(width):
        v = groups[:, first].to(torch.int32)
        for i in range(1, span):
            v |= groups[:, first + i].to(torch.int32) << (8 * i)
        out[:, j] = (v >> shift) & mask if shift else v & mask
    return out.view(-1)[start - g0 * 8:stop - g0 * 8].long()


_BIT_TABLE = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # [256, 8]: byte -> its bits


def pack_monotone(values: torch.Tensor, top: int) -> torch.Tensor:
    """values [n, count] non-decreasing per row, in [0, top] -> uint8 [n, monotone_bytes(count, top)]."""
    n, count = values.shape
    width = monotone_bytes(count, top)
    bits = torch.zeros(n, width * 8, dtype=torch.uint8)
    bits.scatter_(1, values.long() + torch.arange(count), 1)
    return (bits.view(n, width, 8).long() << torch.arange(8)).sum(-1).to(torch.uint8)


def _unpack_monotone_torch(bitmap: torch.Tensor, count: int) -> torch.Tensor:
    """Backend "torch" of fastkd::unpack_monotone: the positions of each row's ones, less their rank."""
    n = bitmap.shape[0]
    bits = _BIT_TABLE[bitmap.long()].reshape(n, -1)
    pos = bits.nonzero()[:, 1]
    if pos.numel() != n * count:
        raise ValueError(f"unpack_monotone: the bitmap holds {pos.numel()} values, expected {n} x {count}")
    return pos.view(n, count) - torch.arange(count)


def _register():
    torch.library.impl("fastkd::unpack_bits_torch", "CompositeExplicitAutograd")(_unpack_torch)
    torch.library.impl("fastkd::unpack_monotone_torch", "CompositeExplicitAutograd")(_unpack_monotone_torch)
    for name in ("unpack_bits", "unpack_bits_torch"):
        torch.library.register_fake(f"fastkd::{name}")(
            lambda stream, width, start, stop: stream.new_empty(stop - start, dtype=torch.long))
    for name in ("unpack_monotone", "unpack_monotone_torch"):
        torch.library.register_fake(f"fastkd::{name}")(
            lambda bitmap, count: bitmap.new_empty(bitmap.shape[0], count, dtype=torch.long))


_register()


def _decoder(name: str, backend: str):
    """The op `name` of `backend` ("auto": the C++ one when fastkd._C is built, else its twin)."""
    chosen = backends.resolve(backend, torch.device("cpu"), implemented=("torch", "cpu"), op=name)
    return getattr(torch.ops.fastkd, name if chosen == "cpu" else name + "_torch")


def unpack(stream: torch.Tensor, width: int, start: int, stop: int, backend: str = "auto") -> torch.Tensor:
    """Values [start, stop) of a packed stream (uint8, the whole stream) -> int64 [stop - start]."""
    return _decoder("unpack_bits", backend)(stream, width, start, stop)


def unpack_monotone(bitmap: torch.Tensor, count: int, backend: str = "auto") -> torch.Tensor:
    """bitmap [n, B] uint8 of `count` non-decreasing values per row -> int64 [n, count]."""
    return _decoder("unpack_monotone", backend)(bitmap, count)
