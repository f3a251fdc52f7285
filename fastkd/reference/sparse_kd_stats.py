"""Backend "torch" of the op sparse_kd_stats (fastkd/_ops.py): the partial statistics of one
rank's slice of the vocabulary for the vocab-parallel sparse loss (fastkd.distributed); the
columns are fastkd/_ops.py's SPARSE_STATS."""
import torch

from .. import _op_checks, _ops
from ._rows import NEG_INF, chunk_rows, max_sum


def slice_ids(indices, logprobs, vocab):
    """(ids [n, k] clamped into the slice, mask [n, k] of the teacher's entries of I -- finite
    log-prob -- that lie in this slice [0, vocab), in_i [n, vocab] bool: the slice's columns in I)."""
    here = (logprobs > NEG_INF) & (indices >= 0) & (indices < vocab)
    ids = torch.where(here, indices, 0)
    in_i = torch.zeros(indices.shape[0], vocab, dtype=torch.int32, device=indices.device)
    if vocab:  # (a rank may hold an empty slice)
        in_i.scatter_add_(-1, ids, here.int())
    return ids, here, in_i > 0


def _stats_chunk(s, idx, lp, temperature, hard):
    acc = _ops.acc_dtype(s.dtype)
    a = s.to(acc) * (1.0 / temperature)
    _, _, in_i = slice_ids(idx, lp, s.shape[1])
    m_in, s_in, _ = max_sum(torch.where(in_i, a, NEG_INF))
    m_out, s_out, _ = max_sum(torch.where(in_i, NEG_INF, a))
    if hard:
        m_1, s_1, _ = max_sum(s.to(acc))
    else:
        m_1, s_1 = torch.full_like(m_in, NEG_INF), torch.zeros_like(s_in)
    return torch.cat([m_in, s_in, m_out, s_out, m_1, s_1], -1)


def sparse_kd_stats(student, indices, logprobs, temperature, hard):
    """student [N, V_slice], indices/logprobs [N, k] (global ids less the slice's start) ->
    [N, 6] float64 (SPARSE_STATS)."""
    _op_checks.sparse_stats(student, indices, logprobs, temperature)
    n, vocab = student.shape
    out = student.new_empty(n, len(_ops.SPARSE_STATS), dtype=torch.float64)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        rows = slice(r, r + step)
        out[rows] = _stats_chunk(student[rows], indices[rows], logprobs[rows], temperature, hard)
    return out
