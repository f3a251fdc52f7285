"""Backend "torch" of the op dense_kd_shard (fastkd/_ops.py): one rank's slice of the
vocab-parallel dense loss (fastkd.distributed), given the whole row's statistics (_ops.DENSE_ROW).
Returns the slice's shares of D = sum term and U = sum u, and its slice of the gradient
w_kd (u - q U) + w_hard (softmax(s) - onehot), the math of fastkd/_math.py's elem."""
import torch

from .. import _math, _op_checks, _ops
from ._rows import NEG_INF, chunk_rows


def shard_labels(labels, vocab, ignore_index, n, device):
    """(kept [n, 1], here [n, 1], local ids [n, 1]): rows not ignored; rows whose label lies in
    this slice [0, vocab) (other labels belong to other ranks' slices), and those ids (0 elsewhere)."""
    if labels is None:
        ones = torch.ones(n, 1, dtype=torch.bool, device=device)
        return ones, ~ones, torch.zeros(n, 1, dtype=torch.long, device=device)
    lab = labels.unsqueeze(-1)
    here = (lab >= 0) & (lab < vocab) & (lab != ignore_index)
    return lab != ignore_index, here, torch.where(here, lab, 0)


def _probs(x, m, log_s):
    """(exp(x - lse), x - lse) in x's dtype for lse = m + log_s, formed as softmax_parts does."""
    m = torch.where(m > NEG_INF, m, 0.0)
    e = (x - m.to(x.dtype)).exp() * (-log_s).exp().to(x.dtype)
    return e, (x - m.to(x.dtype)) - log_s.to(x.dtype)


def _shard_chunk(s, t, labels, rs, divergence, temperature, beta, ignore_index, w, compute_grad):
    acc = _ops.acc_dtype(s.dtype)
    m_a, log_s_a, m_b, log_s_b, dl, m_1, log_s_1, big_u = rs.split(1, -1)
    poisoned = rs.isnan().any(-1, keepdim=True)
    live = (m_a > NEG_INF) & ~poisoned
    kd_on = live & (m_b > NEG_INF)
    a = s.to(acc) * (1.0 / temperature)
    b = t.to(acc) * (1.0 / temperature)
    q, lq = _probs(a, torch.where(live, m_a, 0.0), torch.where(live, log_s_a, 0.0))
    p, lp = _probs(b, torch.where(kd_on, m_b, 0.0), torch.where(kd_on, log_s_b, 0.0))
    term, u = _math.elem(divergence, p, q, lp, lq, (b - a) - torch.where(kd_on, dl, 0.0).to(acc), beta)
    zero = torch.zeros((), dtype=acc, device=s.device)
    term, u = torch.where(kd_on, term, zero), torch.where(kd_on, u, zero)
    kept, here, local = shard_labels(labels, s.shape[1], ignore_index, s.shape[0], s.device)
    nan = torch.full((), float("nan"), dtype=torch.float64, device=s.device)
    parts = torch.cat([term.sum(-1, keepdim=True, dtype=torch.float64), u.sum(-1, keepdim=True, dtype=torch.float64)],
                      -1)
    parts = torch.where(kept, torch.where(poisoned, nan, parts), 0.0)
    grad = None
    if compute_grad:
        grad = torch.where(kd_on, w.kd_grad * (u - q * _math.gradient_u(big_u).to(acc)), zero)
        if w.hard > 0:
            q1, _ = _probs(s.to(acc), torch.where(live, m_1, 0.0), torch.where(live, log_s_1, 0.0))
            grad = grad + torch.where(live, w.hard_grad * q1, zero)
            if s.shape[1]:  # (a rank may hold an empty slice)
                grad.scatter_add_(-1, local, torch.where(here & live, -w.hard_grad, zero).to(acc))
        grad = torch.where(kept, torch.where(poisoned, nan.to(acc), grad), zero)
    return parts, grad


def dense_kd_shard(student, teacher, labels, row_stats, divergence, temperature, beta, ignore_index,
                   hard_weight, scale_by_t2, grad_scale, compute_grad):
    """student, teacher [N, V_slice], labels [N] (ids of this slice; others: another slice's),
    row_stats [N, 8] float64 (DENSE_ROW) -> (parts [N, 2] float64 (D, U shares), grad [N, V_slice]
    or empty)."""
    _op_checks.dense_shard(student, teacher, labels, row_stats, divergence, temperature, beta, ignore_index)
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    n, vocab = student.shape
    parts = student.new_empty(n, 2, dtype=torch.float64)
    _, grad = _ops.row_loss_outputs(student, compute_grad)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        rows = slice(r, r + step)
        parts[rows], g = _shard_chunk(student[rows], teacher[rows], None if labels is None else labels[rows],
                                      row_stats[rows], divergence, temperature, beta, ignore_index, w, compute_grad)
        if compute_grad:
            grad[rows] = g
    return parts, grad
