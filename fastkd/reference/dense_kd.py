"""Backend "torch" of the op dense_kd (fastkd/_ops.py): the pure-PyTorch reference every
other backend is tested against. The math is fastkd/_math.py, the same as the kernels'."""
import torch

from .. import _math, _op_checks, _ops
from ._rows import chunked_rows, finish_rows, finite_rows, not_a_number, softmax_parts


def _dense_chunk(s, t, labels, divergence, temperature, beta, ignore_index, w, compute_grad):
    """Loss [n] and gradient [n, V] (acc dtype) of one chunk of rows."""
    acc = _ops.acc_dtype(s.dtype)
    inv_t = 1.0 / temperature
    a, s_ok = finite_rows(s.to(acc) * inv_t)
    b, t_ok = finite_rows(t.to(acc) * inv_t)
    q, la = softmax_parts(a)
    p, lb = softmax_parts(b)
    lq, lp = a - la.to(acc), b - lb.to(acc)
    term, u = _math.elem(divergence, p, q, lp, lq, (b - a) - _math.lse_shift(a, b, q, la, lb).to(acc), beta)
    kd_ok = (s_ok & t_ok).unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=s.device)
    loss = w.kd_loss * torch.where(kd_ok, term, zero).sum(-1, dtype=torch.float64).clamp_min(0).to(acc)
    grad = None
    if compute_grad:
        big_u = _math.gradient_u(u.sum(-1, keepdim=True, dtype=torch.float64).to(acc))
        grad = torch.where(kd_ok, w.kd_grad * (u - q * big_u), zero)
    return finish_rows(s, s_ok, labels, ignore_index, w, loss, grad, poisoned=not_a_number(t))


def dense_kd(student, teacher, labels, divergence, temperature, beta, ignore_index,
             hard_weight, scale_by_t2, grad_scale, compute_grad):
    """student, teacher [N, V] -> (loss [N], grad [N, V] or empty); see fastkd/_ops.py."""
    _op_checks.row_loss("dense_kd", student, labels, temperature, ignore_index, hard_weight)
    _op_checks.dense(student, teacher, divergence, beta)
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    return chunked_rows(student, labels, compute_grad, lambda rows, lab: _dense_chunk(
        student[rows], teacher[rows], lab, divergence, temperature, beta, ignore_index, w, compute_grad))
