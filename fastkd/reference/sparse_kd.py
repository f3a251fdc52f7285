"""Backend "torch" of the op sparse_kd (fastkd/_ops.py): forward KL against a teacher known on
k ids per row, I (the entries with a finite logprob). The per-row math is fastkd/_math.py
(the twin of csrc/sparse_math.h): every student quantity is a log-sum-exp at its own maximum --
over the row, over I, over the ids outside I -- so a row whose exact loss is finite gets a finite
loss and gradient however far below the row's maximum its parts lie. Row sums in float64.
"""
import torch

from .. import _math, _op_checks, _ops
from ._rows import NEG_INF, chunked_rows, finish_rows, finite_rows, log_normaliser


def _exp_below(a: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """exp(a - norm) in float64, 0 where a = -inf (norm may then be -inf too)."""
    return torch.where(a > NEG_INF, (a.double() - norm).exp(), 0.0)


def _sparse_chunk(s, idx, lp, tail_lp, labels, tail, temperature, ignore_index, w, compute_grad):
    acc = _ops.acc_dtype(s.dtype)
    a, s_ok = finite_rows(s.to(acc) * (1.0 / temperature))
    known = lp > NEG_INF  # [n, k]; padding is not in I, even where its id repeats a real one
    in_i = torch.zeros(a.shape, dtype=torch.int32, device=a.device).scatter_add_(-1, idx, known.int()) > 0
    a_i = a.gather(-1, idx).double()
    lse_in = log_normaliser(torch.where(known, a_i, NEG_INF))
    lse_tail = log_normaliser(torch.where(in_i, NEG_INF, a))
    c = _math.tail_coefficients(
        tail, torch.logaddexp(lse_in, lse_tail), lse_in, lse_tail,
        log_normaliser(torch.where(known, lp.double(), NEG_INF)), tail_lp.double().unsqueeze(-1))
    kd = (_math.sparse_term(lp.double(), a_i, c).sum(-1) + c.extra.squeeze(-1)).clamp_min(0)
    grad = None
    if compute_grad:
        lse_all = torch.logaddexp(lse_in, lse_tail)
        inside = c.in_scale * _exp_below(a, c.in_norm)
        outside = c.out_scale * _exp_below(a, lse_all) - c.tail_scale * _exp_below(a, lse_tail)
        target = torch.where(known, (lp.double() - c.shift).exp(), 0.0)
        grad = torch.where(in_i, inside, outside).scatter_add_(-1, idx, -target)
        grad = (w.kd_grad * grad).to(acc)
    poisoned = lp.isnan().any(-1) | tail_lp.isnan()
    return finish_rows(s, s_ok, labels, ignore_index, w, w.kd_loss * kd.to(acc), grad, poisoned)


def sparse_kd(student, indices, logprobs, tail_logmass, labels, tail, temperature, ignore_index,
              hard_weight, scale_by_t2, grad_scale, compute_grad):
    """student [N, V], indices/logprobs [N, k], tail_logmass [N] -> (loss [N], grad [N, V])."""
    _op_checks.row_loss("sparse_kd", student, labels, temperature, ignore_index, hard_weight)
    _op_checks.sparse(student, indices, logprobs, tail_logmass)
    if tail not in _math.TAILS:
        raise ValueError(f"fastkd::sparse_kd: unknown tail '{tail}'")
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    return chunked_rows(student, labels, compute_grad, lambda rows, lab: _sparse_chunk(
        student[rows], indices[rows], logprobs[rows], tail_logmass[rows], lab, tail, temperature,
        ignore_index, w, compute_grad))
