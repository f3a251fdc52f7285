"""Backend "torch": the pure-PyTorch reference every other backend is tested against.

It runs wherever PyTorch runs, chunked over rows so it never holds more than one chunk of fp32
temporaries (about CHUNK_ELEMENTS elements each) besides the gradient it returns. The math is
fastkd._math, the same as the kernels'.
"""
import torch

from . import _math

CHUNK_ELEMENTS = 1 << 20  # elements per fp32 temporary: 4 MiB


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab` entries."""
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def _finite_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with rows that have no finite entry replaced by zeros, mask of the other rows)."""
    ok = x.amax(-1) > float("-inf")
    return torch.where(ok.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)), ok


def _dense_chunk(s, t, labels, divergence, temperature, beta, ignore_index, w, compute_grad):
    """Loss [n] and gradient [n, V] (acc dtype) of one chunk of rows."""
    acc = _math.acc_dtype(s.dtype)
    inv_t = 1.0 / temperature
    a, s_ok = _finite_rows(s.to(acc) * inv_t)
    b, t_ok = _finite_rows(t.to(acc) * inv_t)
    lq, lp = a.log_softmax(-1), b.log_softmax(-1)
    q = lq.exp()
    term, u = _math.elem(divergence, lp.exp(), q, lp, lq, beta)
    kd_ok = (s_ok & t_ok).unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=s.device)
    loss = w.kd_loss * torch.where(kd_ok, term, zero).sum(-1)
    grad = None
    if compute_grad:
        grad = torch.where(kd_ok, w.kd_grad * (u - q * u.sum(-1, keepdim=True)), zero)
    keep = s_ok
    if labels is not None:
        keep = keep & (labels != ignore_index)
        if w.hard > 0:
            safe = torch.where(labels == ignore_index, 0, labels).unsqueeze(-1)
            ls = _finite_rows(s.to(acc))[0].log_softmax(-1)
            loss = loss - w.hard * ls.gather(-1, safe).squeeze(-1)
            if compute_grad:
                grad = grad + w.hard * ls.exp()
                grad.scatter_add_(-1, safe, torch.full_like(safe, -w.hard, dtype=acc))
    loss = torch.where(keep, loss, zero)
    if grad is not None:
        grad = torch.where(keep.unsqueeze(-1), grad, zero)
    return loss, grad


def dense_kd_rows(student, teacher, labels, divergence, temperature, beta, ignore_index,
                  hard_weight, scale_by_t2, compute_grad):
    """The `fastkd::dense_kd_torch` op: see fastkd/_schemas.py for shapes."""
    n, vocab = student.shape
    w = _math.row_weights(temperature, hard_weight, scale_by_t2)
    loss = student.new_empty(n, dtype=_math.acc_dtype(student.dtype))
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        rows = slice(r, r + step)
        lab = None if labels is None else labels[rows]
        loss[rows], g = _dense_chunk(student[rows], teacher[rows], lab, divergence, temperature,
                                     beta, ignore_index, w, compute_grad)
        if compute_grad:
            grad[rows] = g
    return loss, grad


torch.library.impl("fastkd::dense_kd_torch", "CompositeExplicitAutograd")(dense_kd_rows)
