"""The per-row math of the sparse-teacher loss, in PyTorch: the twin of csrc/sparse_math.h.

Forward KL of the student a = s / T against a teacher known on the ids I, every student quantity
a log-sum-exp with its own maximum (lse_all over the row, lse_in over I, lse_tail outside I).
With t_i = exp(lp_i - shift) the teacher's target on I:

    loss        = sum_I t_i ((lp_i - shift) - (a_i - norm)) + extra
    dloss/da_j  = in_scale exp(a_j - in_norm) - t_j                               j in I
                = out_scale exp(a_j - lse_all) - tail_scale exp(a_j - lse_tail)   j not in I

Every argument and field is a float64 tensor of per-row values (any shape). Keep this file and
sparse_math.h line-for-line alike.
"""
from typing import NamedTuple

import torch

TAILS = ("bucket", "renorm_teacher", "renorm_both")


class TailCoef(NamedTuple):
    shift: torch.Tensor
    norm: torch.Tensor
    extra: torch.Tensor
    in_scale: torch.Tensor
    in_norm: torch.Tensor
    out_scale: torch.Tensor
    tail_scale: torch.Tensor


def tail_coefficients(tail: str, lse_all, lse_in, lse_tail, log_p, tail_lp) -> TailCoef:
    """sparse_math.h's tail_coefficients, for every row at once."""
    zero = torch.zeros_like(lse_all)
    if tail == "bucket":
        r_p = tail_lp.exp()
        scale = log_p.exp() + r_p  # the teacher's whole stored mass, P + r_p
        # r_p (log r_p - log r_q); a tail of no student mass is +inf (the exact value)
        extra = torch.where(r_p > 0, r_p * (tail_lp - (lse_tail - lse_all)), zero)
        return TailCoef(zero, lse_all, extra, scale, lse_all, scale, r_p)
    active = log_p > float("-inf")  # no teacher entry: no KD term
    one = torch.where(active, 1.0, zero)
    shift = torch.where(active, log_p, zero)  # t = p / P
    if tail == "renorm_teacher":
        return TailCoef(shift, lse_all, zero, one, lse_all, one, zero)
    if tail == "renorm_both":  # q^ over I, nothing outside I
        norm = torch.where(active, lse_in, lse_all)
        return TailCoef(shift, norm, zero, one, norm, zero, zero)
    raise ValueError(f"unknown tail={tail!r}; expected one of {TAILS}")


def sparse_term(lp, a, c: TailCoef):
    """The loss term of each id of I ([n, k]; c's fields [n, 1]), 0 for a padding entry."""
    lt = lp - c.shift
    return torch.where(lp > float("-inf"), lt.exp() * (lt - (a - c.norm)), 0.0)
