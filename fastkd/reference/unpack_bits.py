"""Backend "torch" of the op unpack_bits (fastkd/_ops.py), a teacher-cache decoder; the layout
and the encoder are in fastkd/cache/_bits.py (docs/cache-format.md)."""
import torch

from .. import _op_checks


def slots(width: int):
    """(slot, first byte, shift, bytes spanned) for the 8 slots of a group of 8 `width`-bit values
    (w bytes), LSB first: the packed layout, shared by the encoder."""
    for j in range(8):
        bit = j * width
        yield j, bit // 8, bit % 8, (bit % 8 + width + 7) // 8


def unpack_bits(stream: torch.Tensor, width: int, start: int, stop: int) -> torch.Tensor:
    """Values [start, stop) of a packed uint8 stream -> int64 [stop - start]: the groups that hold
    them, slot by slot."""
    _op_checks.unpack_bits(stream, width, start, stop)
    g0, g1 = start // 8, -(-stop // 8)
    groups = stream[g0 * width:g1 * width].view(g1 - g0, width)
    out = torch.empty(g1 - g0, 8, dtype=torch.int32)
    mask = (1 << width) - 1
    for j, first, shift, span in slots(width):
        v = groups[:, first].to(torch.int32)
        for i in range(1, span):
            v |= groups[:, first + i].to(torch.int32) << (8 * i)
        out[:, j] = (v >> shift) & mask if shift else v & mask
    return out.view(-1)[start - g0 * 8:stop - g0 * 8].long()
