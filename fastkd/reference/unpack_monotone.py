"""Backend "torch" of the op unpack_monotone (fastkd/_ops.py), a teacher-cache decoder; the
layout and the encoder are in fastkd/cache/_bits.py (docs/cache-format.md)."""
import torch

from .. import _op_checks

_BIT_TABLE = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # [256, 8]: byte -> its bits


def unpack_monotone(bitmap: torch.Tensor, count: int) -> torch.Tensor:
    """bitmap [n, B] uint8 -> int64 [n, count]: the positions of each row's ones, less their rank."""
    _op_checks.unpack_monotone(bitmap, count)
    n = bitmap.shape[0]
    bits = _BIT_TABLE[bitmap.long()].reshape(n, -1)
    ones = bits.sum(-1)
    if (ones != count).any():
        r = int((ones != count).nonzero()[0, 0])
        raise ValueError(f"fastkd::unpack_monotone: row {r} holds {int(ones[r])} values, expected {count} "
                         "(a corrupt bitmap)")
    pos = bits.nonzero()[:, 1]
    return pos.view(n, count) - torch.arange(count)
