"""Backend "torch" of the op sparse_kd_shard (fastkd/_ops.py): one rank's slice of the
gradient of the vocab-parallel sparse loss (fastkd.distributed), given the whole row's tail
coefficients (_ops.SPARSE_ROW); the math of fastkd/_math.py:

    w_kd dloss/da_j = in_scale exp(a_j - in_norm) - t_j                              j in I
                    = out_scale exp(a_j - lse_all) - tail_scale exp(a_j - lse_tail)  j not in I

plus w_hard (softmax(s) - onehot) for hard labels. (The loss needs only [N, k] values, which
fastkd.distributed gathers itself.)"""
import torch

from .. import _math, _op_checks, _ops
from ._rows import NEG_INF, chunk_rows
from .dense_kd_shard import shard_labels
from .sparse_kd import _exp_below
from .sparse_kd_stats import slice_ids


def _shard_chunk(s, idx, lp, labels, rs, temperature, ignore_index, w):
    acc = _ops.acc_dtype(s.dtype)
    shift, in_scale, in_norm, out_scale, lse_all, tail_scale, lse_tail, lse_1 = rs.split(1, -1)
    poisoned = rs.isnan().any(-1, keepdim=True)
    live = (lse_all > NEG_INF) & ~poisoned
    a = s.to(acc) * (1.0 / temperature)
    ids, here, in_i = slice_ids(idx, lp, s.shape[1])
    inside = in_scale * _exp_below(a, in_norm)
    outside = out_scale * _exp_below(a, lse_all) - tail_scale * _exp_below(a, lse_tail)
    target = torch.where(here, (lp.double() - shift).exp(), 0.0)
    grad = torch.where(in_i, inside, outside)
    kept, on_slice, local = shard_labels(labels, s.shape[1], ignore_index, s.shape[0], s.device)
    if s.shape[1] == 0:  # a rank may hold an empty slice
        return grad.to(acc)
    grad = w.kd_grad * grad.scatter_add_(-1, ids, -target)
    if w.hard > 0:
        grad = grad + w.hard_grad * _exp_below(s.to(acc), lse_1)
        grad.scatter_add_(-1, local, torch.where(on_slice, -w.hard_grad, torch.zeros((), dtype=grad.dtype,
                                                                                     device=grad.device)))
    nan = torch.full((), float("nan"), dtype=torch.float64, device=s.device)
    grad = torch.where(live, grad, 0.0)
    return torch.where(kept, torch.where(poisoned, nan, grad), 0.0).to(acc)


def sparse_kd_shard(student, indices, logprobs, labels, row_stats, temperature, ignore_index, hard_weight,
                    scale_by_t2, grad_scale):
    """student [N, V_slice], indices/logprobs [N, k] (global ids less the slice's start), labels
    [N] (ids of this slice; others: another slice's), row_stats [N, 8] float64 (SPARSE_ROW) ->
    grad [N, V_slice] in _ops.grad_dtype."""
    _op_checks.sparse_shard(student, indices, logprobs, labels, row_stats, temperature, ignore_index)
    w = _math.row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    n, vocab = student.shape
    _, grad = _ops.row_loss_outputs(student, True)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        rows = slice(r, r + step)
        grad[rows] = _shard_chunk(student[rows], indices[rows], logprobs[rows],
                                  None if labels is None else labels[rows], row_stats[rows], temperature,
                                  ignore_index, w)
    return grad
