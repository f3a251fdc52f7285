"""Fixed-width bit packing of non-negative integers, vectorised.

A stream of m values of `width` bits is stored as ceil(m / 8) groups of `width` bytes: value j of
a group starts at bit j * width of it, least significant bit first (little-endian). Each of the
8 slots of a group has a fixed byte span and shift, so packing and unpacking are a few
whole-array operations per slot, and the values [a, b) of a stream are read by unpacking only
the groups that hold them.
"""
import torch

MAX_WIDTH = 24  # a slot spans at most 4 bytes, so int32 holds it (vocabularies up to 16.7M ids)


def width_for(count: int) -> int:
    """Bits needed for values 0 .. count - 1 (at least 1)."""
    return max(1, (count - 1).bit_length())


def packed_bytes(m: int, width: int) -> int:
    """Bytes of a packed stream of m values."""
    return -(-m // 8) * width


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


def unpack(stream: torch.Tensor, width: int, start: int, stop: int) -> torch.Tensor:
    """Values [start, stop) of a packed stream (uint8 tensor, whole stream) -> int32 [stop - start]."""
    g0, g1 = start // 8, -(-stop // 8)
    groups = stream[g0 * width:g1 * width].view(g1 - g0, width)
    out = torch.empty(g1 - g0, 8, dtype=torch.int32)
    mask = (1 << width) - 1
    for j, first, shift, span in _slots(width):
        v = groups[:, first].to(torch.int32)
        for i in range(1, span):
            v |= groups[:, first + i].to(torch.int32) << (8 * i)
        out[:, j] = (v >> shift) & mask if shift else v & mask
    return out.view(-1)[start - g0 * 8:stop - g0 * 8]
