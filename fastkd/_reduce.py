"""Reducing per-row losses: the one definition of "mean", "sum" and "none" for every loss."""
import torch


def row_weight(labels, ignore_index: int, reduction: str, n_rows: int, device: torch.device) -> float:
    """The weight reduce_rows gives each row (1 / kept rows for "mean", else 1), for a fused op to
    fold into its gradient. Counting kept rows reads a value back, so off the CPU, and under
    torch.compile (where the count is data-dependent), this returns 1 and backward applies the
    weight instead."""
    if reduction != "mean" or device.type != "cpu" or torch.compiler.is_compiling():
        return 1.0
    return 1.0 / float(kept_rows(labels, ignore_index, n_rows))


def kept_rows(labels, ignore_index: int, n_rows: int):
    """The number of kept rows, at least 1 (a device tensor with labels: no host sync)."""
    if labels is None:
        return max(n_rows, 1)
    return (labels != ignore_index).sum().clamp_min(1)


def reduce_rows(rows: torch.Tensor, labels, ignore_index: int, reduction: str, lead_shape):
    """rows: [N] per-row losses (0 at ignored rows). "mean" divides by the number of kept rows,
    and is 0 (not NaN) when no row is kept; "none" returns the logits' leading shape."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    kept = kept_rows(labels, ignore_index, rows.numel())
    return total / (kept.to(total.dtype) if torch.is_tensor(kept) else kept)
