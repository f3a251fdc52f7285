"""Backend "torch" of the sparse-teacher op `fastkd::sparse_kd_torch` (see fastkd/_schemas.py).

Forward KL of the student against a teacher known on k ids per row, I (entries with a finite
logprob). With p_i = exp(logprobs_i), P = sum_I p, r_p = exp(tail_logmass), q = softmax(s / T)
and r_q the student's own mass outside I (summed over the tail directly, never 1 - sum q_I):

    bucket          sum_I p (log p - log q) + r_p (log r_p - log r_q)
                    d/da_j = q_j (P + r_p) - p_j [j in I] - r_p q_j / r_q [j not in I]
    renorm_teacher  p^ = p / P:  sum_I p^ (log p^ - log q),          d/da_j = q_j - p^_j [j in I]
    renorm_both     q^ = q / q(I) too:  sum_I p^ (log p^ - log q^),  d/da_j = (q^_j - p^_j) [j in I]

Chunked over rows like the dense reference; row sums in float64.
"""
import torch

from . import _math
from .reference import _finite_rows, chunked_rows, finish_rows

TAILS = ("bucket", "renorm_teacher", "renorm_both")


def _sparse_chunk(s, idx, lp, tail_lp, labels, tail, temperature, ignore_index, w, compute_grad):
    acc = _math.acc_dtype(s.dtype)
    f64 = torch.float64
    zero = torch.zeros((), dtype=acc, device=s.device)
    a, s_ok = _finite_rows(s.to(acc) * (1.0 / temperature))
    m = a.amax(-1, keepdim=True)
    e = (a - m).exp()
    known = lp > float("-inf")  # [n, k]; padding is not in I
    in_i = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, idx, known)
    e_i = torch.where(known, e.gather(-1, idx), zero)
    s_all = e.sum(-1, keepdim=True, dtype=f64)
    s_in = e_i.sum(-1, keepdim=True, dtype=f64)
    s_tail = torch.where(in_i, zero, e).sum(-1, keepdim=True, dtype=f64)  # directly, not s_all - s_in
    p = torch.where(known, lp.double().exp(), torch.zeros((), dtype=f64, device=s.device))
    big_p = p.sum(-1, keepdim=True)
    lq_i = a.gather(-1, idx).double() - m.double() - s_all.log()
    q = e * (1.0 / s_all).to(acc)
    if tail == "bucket":
        r_p = tail_lp.double().exp().unsqueeze(-1)
        log_rq = s_tail.log() - s_all.log()
        kd = torch.where(known, p * (lp.double() - lq_i), 0).sum(-1)
        kd = kd + torch.where(r_p.squeeze(-1) > 0, (r_p * (tail_lp.double().unsqueeze(-1) - log_rq)).squeeze(-1), 0)
        grad = q * (big_p + r_p).to(acc)
        ratio = torch.where(s_tail > 0, r_p / s_tail, torch.zeros((), dtype=f64, device=s.device))
        grad = grad - torch.where(in_i, zero, e * ratio.to(acc))
        target = p
    else:
        p_hat = p / big_p
        lp_hat = lp.double() - big_p.log()
        if tail == "renorm_teacher":
            kd = torch.where(known, p_hat * (lp_hat - lq_i), 0).sum(-1)
            grad = q
        else:
            lq_hat = a.gather(-1, idx).double() - m.double() - s_in.log()
            kd = torch.where(known, p_hat * (lp_hat - lq_hat), 0).sum(-1)
            grad = torch.zeros_like(a).scatter_(-1, idx, torch.where(known, e_i * (1.0 / s_in).to(acc), zero))
        target = p_hat
    grad = grad.scatter_add(-1, idx, torch.where(known, -target.to(acc), zero)) if compute_grad else None
    loss = w.kd_loss * kd.to(acc)
    if grad is not None:
        grad = w.kd_grad * grad
    return finish_rows(s, s_ok, labels, ignore_index, w, loss, grad)


def sparse_kd_rows(student, indices, logprobs, tail_logmass, labels, tail, temperature, ignore_index,
                   hard_weight, scale_by_t2, grad_scale, compute_grad):
    """The `fastkd::sparse_kd_torch` op."""
    if tail not in TAILS:
        raise ValueError(f"unknown tail={tail!r}; expected one of {TAILS}")
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    return chunked_rows(student, labels, compute_grad, lambda rows, lab: _sparse_chunk(
        student[rows], indices[rows], logprobs[rows], tail_logmass[rows], lab, tail, temperature,
        ignore_index, w, compute_grad))


torch.library.impl("fastkd::sparse_kd_torch", "CompositeExplicitAutograd")(sparse_kd_rows)
