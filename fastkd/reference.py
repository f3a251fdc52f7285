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


def _softmax_parts(x: torch.Tensor):
    """(softmax(x), float64 logsumexp(x) [.., 1]) over the last dim, formed as the kernels do:
    exp(x - max) / sum, with the sum in float64. (exp(x - logsumexp(x)) rounds x - lse to fp32
    first, a ~1e-6 error in the largest probabilities; a plain fp32 sum over a 128k vocabulary
    drifts by ~1e-6 too, the size of a small KL.)"""
    m = x.amax(-1, keepdim=True)
    e = (x - m).exp()
    total = e.sum(-1, keepdim=True, dtype=torch.float64)
    return e * (1.0 / total).to(x.dtype), m.double() + total.log()


def finish_rows(s, s_ok, labels, ignore_index, w, loss, grad):
    """Add the hard-label CE term (temperature 1) to a chunk's KD loss [n] and gradient [n, V]
    (or None), then zero the rows that are ignored or have no finite student logit."""
    acc = loss.dtype
    zero = torch.zeros((), dtype=acc, device=s.device)
    keep = s_ok
    if labels is not None:
        keep = keep & (labels != ignore_index)
        if w.hard > 0:
            safe = torch.where(labels == ignore_index, 0, labels).unsqueeze(-1)
            s1 = _finite_rows(s.to(acc))[0]
            q1, l1 = _softmax_parts(s1)
            loss = loss + w.hard * (l1.squeeze(-1) - s1.gather(-1, safe).squeeze(-1).double()).to(acc)
            if grad is not None:
                grad = grad + w.hard_grad * q1
                grad.scatter_add_(-1, safe, torch.full_like(safe, -w.hard_grad, dtype=acc))
    loss = torch.where(keep, loss, zero)
    if grad is not None:
        grad = torch.where(keep.unsqueeze(-1), grad, zero)
    return loss, grad


def _dense_chunk(s, t, labels, divergence, temperature, beta, ignore_index, w, compute_grad):
    """Loss [n] and gradient [n, V] (acc dtype) of one chunk of rows."""
    acc = _math.acc_dtype(s.dtype)
    inv_t = 1.0 / temperature
    a, s_ok = _finite_rows(s.to(acc) * inv_t)
    b, t_ok = _finite_rows(t.to(acc) * inv_t)
    q, la = _softmax_parts(a)
    p, lb = _softmax_parts(b)
    lq, lp = a - la.to(acc), b - lb.to(acc)
    term, u = _math.elem(divergence, p, q, lp, lq, (b - a) - (lb - la).to(acc), beta)
    kd_ok = (s_ok & t_ok).unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=s.device)
    loss = w.kd_loss * torch.where(kd_ok, term, zero).sum(-1, dtype=torch.float64).to(acc)
    grad = None
    if compute_grad:
        big_u = u.sum(-1, keepdim=True, dtype=torch.float64).to(acc)
        grad = torch.where(kd_ok, w.kd_grad * (u - q * big_u), zero)
    return finish_rows(s, s_ok, labels, ignore_index, w, loss, grad)


def chunked_rows(student, labels, compute_grad, chunk):
    """Run `chunk(rows, labels_of_rows) -> (loss [n], grad [n, V] or None)` over row chunks of
    `student` [N, V]; returns the op's (loss [N], grad [N, V] or an empty tensor)."""
    n, vocab = student.shape
    loss = student.new_empty(n, dtype=_math.acc_dtype(student.dtype))
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        rows = slice(r, r + step)
        loss[rows], g = chunk(rows, None if labels is None else labels[rows])
        if compute_grad:
            grad[rows] = g
    return loss, grad


def dense_kd_rows(student, teacher, labels, divergence, temperature, beta, ignore_index,
                  hard_weight, scale_by_t2, grad_scale, compute_grad):
    """The `fastkd::dense_kd_torch` op: see fastkd/_schemas.py for shapes."""
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    return chunked_rows(student, labels, compute_grad, lambda rows, lab: _dense_chunk(
        student[rows], teacher[rows], lab, divergence, temperature, beta, ignore_index, w, compute_grad))


torch.library.impl("fastkd::dense_kd_torch", "CompositeExplicitAutograd")(dense_kd_rows)
