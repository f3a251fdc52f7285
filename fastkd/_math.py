"""The math of every loss, in PyTorch: the twin of csrc/kd_math.h (the dense divergences, per
element) and csrc/sparse_math.h (the sparse teacher's tails, per row), and the names of both.

Per row, with p = softmax(t/T) (teacher) and q = softmax(s/T) (student), each divergence gives
two per-element tensors:

    term : D = term.sum(-1)
    u    : the q-weighted score, dD/d(s/T) = u - q * u.sum(-1, keepdim=True)

Terms follow 0 * log 0 = 0, so masked (-inf) entries never make NaN. Keep this file and
kd_math.h / sparse_math.h line-for-line alike.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

# The one home of these names (kd_math.h's kDivergenceNames and sparse_math.h's enums mirror them;
# the Triton kernels' constexpr codes are their positions here).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
TAILS = ("bucket", "renorm_teacher", "renorm_both")
NEG_INF = float("-inf")


def _unless_zero(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.where(w == 0, torch.zeros((), dtype=y.dtype, device=y.device), y)


def mix_log_ratios(d, w: float, log_w: float, log_omw: float):
    """(log x/m, log y/m) for m = w x + (1 - w) y, from d = log x - log y (kd_math.h): the log1p /
    expm1 forms where |d| < 1 (exact near d = 0, where the naive difference cancels), the
    log-sum-exp forms elsewhere and for infinite d."""
    near = d.abs() < 1
    lw, lomw = torch.full_like(d, log_w), torch.full_like(d, log_omw)
    lx_m = torch.where(near, -torch.log1p((1 - w) * torch.expm1(-d)), -torch.logaddexp(lw, lomw - d))
    ly_m = torch.where(near, -torch.log1p(w * torch.expm1(d)), -torch.logaddexp(lw + d, lomw))
    return lx_m, ly_m


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
        lp_m, lq_m = mix_log_ratios(d, beta, log_b, log_1mb)
        kq = _unless_zero(q, q * lq_m)
        return _unless_zero(p, beta * p * lp_m) + (1 - beta) * kq, (1 - beta) * kq
    if divergence == "skew_forward_kl":
        lp_m, _ = mix_log_ratios(d, beta, log_b, log_1mb)
        return _unless_zero(p, p * lp_m), _unless_zero(p, -(1 - beta) * q * lp_m.exp())
    if divergence == "skew_reverse_kl":
        lq_m, _ = mix_log_ratios(-d, beta, log_b, log_1mb)
        return _unless_zero(q, q * lq_m), _unless_zero(q, q * (lq_m - beta * lq_m.exp()))
    if divergence == "tvd":
        diff = torch.where(d.abs() < 1, q * torch.expm1(d), p - q)  # p - q, exact near d = 0
        return 0.5 * diff.abs(), 0.5 * q * torch.sign(-diff)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")


def gradient_u(u_sum: torch.Tensor) -> torch.Tensor:
    """kd_math.h's gradient_u: a row's U, NaN where it is not finite (the divergence is +inf through
    a masked teacher id the student gives mass: the gradient row is NaN, docs/math.md)."""
    return torch.where(u_sum.isfinite(), u_sum, torch.full_like(u_sum, float("nan")))


CLOSE_ROW = 1.0  # kd_math.h's kCloseRow


def close_row_sum(a, b, e):
    """(r, far), each [n, 1]: r = sum_j e_j expm1(b_j - a_j) in float64 (-e_j where b_j = -inf,
    0 where e_j = 0), far = whether some entry with b > -inf has |b - a| >= CLOSE_ROW. With e = q
    the row is close when not far, and then lse(b) - lse(a) = log1p(r) (lse_shift); with e =
    exp(a - m) over a slice of the vocabulary, r is that slice's share (fastkd.distributed)."""
    support = b > float("-inf")
    delta = (b - a).double()
    far = (support & (delta.abs() >= CLOSE_ROW)).any(-1, keepdim=True)
    terms = torch.where(support, e.double() * torch.expm1(delta.clamp(-CLOSE_ROW, CLOSE_ROW)), -e.double())
    return torch.where(e > 0, terms, 0.0).sum(-1, keepdim=True), far


def lse_shift(a, b, q, la, lb):
    """dL = lse(b) - lse(a) per row ([n, 1] float64), kd_math.h's rule: for a close row (every
    entry with b > -inf has |b - a| < CLOSE_ROW) log1p(sum_j q_j expm1(b_j - a_j)), exact to
    rounding, else lb - la."""
    r, far = close_row_sum(a, b, q)
    return torch.where(far, lb - la, torch.log1p(r))


def max_sum(x: torch.Tensor):
    """(m, total, e): the row maximum m and total = sum exp(x - m) ([.., 1] float64), with
    e = exp(x - m) in x's dtype; m = -inf, total = 0, e = 0 for a row with no finite entry, and
    total NaN for a row holding a NaN or +inf. The partial log-sum-exp of a vocabulary slice."""
    if x.shape[-1] == 0:
        m = x.new_full((*x.shape[:-1], 1), NEG_INF, dtype=torch.float64)
        return m, torch.zeros_like(m), x
    m = x.amax(-1, keepdim=True)
    safe = torch.where(m > NEG_INF, m, torch.zeros_like(m))
    e = (x - safe).exp()
    return m.double(), e.sum(-1, keepdim=True, dtype=torch.float64), e


def log_normaliser(x: torch.Tensor) -> torch.Tensor:
    """float64 logsumexp over the last dim ([.., 1]) at the row's own maximum; -inf for a row with
    no finite entry."""
    m, total, _ = max_sum(x)
    return torch.where(m > NEG_INF, m, 0.0) + total.log()


def not_a_number(x: torch.Tensor) -> torch.Tensor:
    """[n] mask of the rows of x that hold a NaN or +inf (docs/math.md: such a row is NaN)."""
    m = x.amax(-1)
    return m.isnan() | (m == float("inf"))


# ---- the sparse teacher (csrc/sparse_math.h) ------------------------------------------------
# Forward KL of the student a = s / T against a teacher known on the ids I, every student quantity
# a log-sum-exp with its own maximum (lse_all over the row, lse_in over I, lse_tail outside I).
# With t_i = exp(lp_i - shift) the teacher's target on I:
#
#     loss        = sum_I t_i ((lp_i - shift) - (a_i - norm)) + extra
#     dloss/da_j  = in_scale exp(a_j - in_norm) - t_j                               j in I
#                 = out_scale exp(a_j - lse_all) - tail_scale exp(a_j - lse_tail)   j not in I
#
# Every argument and field is a float64 tensor of per-row values (any shape). Keep this file and
# sparse_math.h line-for-line alike.

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
