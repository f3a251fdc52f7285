"""Backend "torch" of the op unpack_monotone (fastkd/_schemas.py), a teacher-cache decoder; the
layout and the encoder are in fastkd/cache/_bits.py (docs/cache-format.md)."""
import torch

_BIT_TABLE = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1  # [256, 8]: byte -> its bits


def unpack_monotone(bitmap: torch.Tensor, count: int) -> torch.Tensor:
    """bitmap [n, B] uint8 -> int64 [n, count]: the positions of each row's ones, less their rank."""
    n = bitmap.shape[0]
    bits = _BIT_TABLE[bitmap.long()].reshape(n, -1)
    pos = bits.nonzero()[:, 1]
    if pos.numel() != n * count:
        raise ValueError(f"unpack_monotone: the bitmap holds {pos.numel()} values, expected {n} x {count}")
    return pos.view(n, count) - torch.arange(count)
