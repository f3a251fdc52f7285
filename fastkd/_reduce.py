"""Reducing per-row losses: the one definition of "mean", "sum" and "none" for every loss."""
import torch


def reduce_rows(rows: torch.Tensor, labels, ignore_index: int, reduction: str, lead_shape):
    """rows: [N] per-row losses (0 at ignored rows). "mean" divides by the number of kept rows,
    and is 0 (not NaN) when no row is kept; "none" returns the logits' leading shape."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if labels is None:
        return total / max(rows.numel(), 1)
    kept = (labels != ignore_index).sum().clamp_min(1)
    return total / kept.to(total.dtype)
