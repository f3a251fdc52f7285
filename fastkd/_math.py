"""The per-element math of every dense divergence, in PyTorch: the twin of csrc/kd_math.h.

Per row, with p = softmax(t/T) (teacher) and q = softmax(s/T) (student), each divergence gives
two per-element tensors:

    term : D = term.sum(-1)
    u    : the q-weighted score, dD/d(s/T) = u - q * u.sum(-1, keepdim=True)

Terms follow 0 * log 0 = 0, so masked (-inf) entries never make NaN. Keep this file and
kd_math.h line-for-line alike.
"""
import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def _unless_zero(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(w == 0, torch.zeros((), dtype=y.dtype, device=y.device), y)


def _log_mix(log_a: float, lx, log_b: float, ly):
    """log(a e^lx + b e^ly) in log space: exact where the linear mixture would underflow."""
    return torch.logaddexp(lx + log_a, ly + log_b)


def elem(divergence: str, p, q, lp, lq, d, beta: float):
    """(term, u) for `divergence`; p, q, lp, lq are [..., V] tensors of one float dtype and
    d = lp - lq computed as (b - a) - (lse(b) - lse(a)), without the rounding of lp and lq."""
    if divergence == "forward_kl":
        return _unless_zero(p, p * d), -p
    if divergence == "reverse_kl":
        term = _unless_zero(q, -q * d)
        return term, term
    log_b, log_1mb = (math.log(beta) if beta > 0 else -math.inf), math.log1p(-beta)
    if divergence == "jsd":
        lm = _log_mix(log_b, lp, log_1mb, lq)
        kq = _unless_zero(q, q * (lq - lm))
        return _unless_zero(p, beta * p * (lp - lm)) + (1 - beta) * kq, (1 - beta) * kq
    if divergence == "skew_forward_kl":
        lm = _log_mix(log_b, lp, log_1mb, lq)
        return _unless_zero(p, p * (lp - lm)), _unless_zero(p, -(1 - beta) * q * (lp - lm).exp())
    if divergence == "skew_reverse_kl":
        lm = _log_mix(log_b, lq, log_1mb, lp)
        return _unless_zero(q, q * (lq - lm)), _unless_zero(q, q * (lq - lm - beta * (lq - lm).exp()))
    if divergence == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


@dataclass(frozen=True)
class RowWeights:
    """How KD and hard-label CE combine per row (kd_math.h's row_weights).

    row loss = kd_loss * D + hard * CE;
    grad_scale * d loss/d s = kd_grad * (u - q U) + hard_grad * (softmax(s) - onehot)
    """

    kd_loss: float
    kd_grad: float
    hard: float
    hard_grad: float


def row_weights(temperature: float, hard_weight: float, scale_by_t2: bool, grad_scale: float) -> RowWeights:
    """grad_scale: the reduction's weight of each row, folded into the gradient (kd_math.h)."""
    kd = (1.0 - hard_weight) * (temperature * temperature if scale_by_t2 else 1.0)
    return RowWeights(kd, grad_scale * kd / temperature, hard_weight, grad_scale * hard_weight)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a logits dtype: fp64 for fp64, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
