"""Backend "torch" of the op dense_kd_stats (fastkd/_ops.py): the partial statistics of one
rank's slice of the vocabulary for the vocab-parallel dense loss (fastkd.distributed); the
columns are fastkd/_ops.py's DENSE_STATS."""
import torch

from .. import _math, _op_checks, _ops
from ._rows import NEG_INF, chunk_rows, max_sum


def _stats_chunk(s, t, temperature, hard):
    acc = _ops.acc_dtype(s.dtype)
    a = s.to(acc) * (1.0 / temperature)
    b = t.to(acc) * (1.0 / temperature)
    m_a, s_a, e_a = max_sum(a)
    m_b, s_b, _ = max_sum(b)
    r_a, far = _math.close_row_sum(a, b, e_a)
    r_a = torch.where(far, 0.0, r_a)  # a far slice makes the row far, where r is not used
    if hard:
        m_1, s_1, _ = max_sum(s.to(acc))
    else:
        m_1, s_1 = torch.full_like(m_a, NEG_INF), torch.zeros_like(s_a)
    return torch.cat([m_a, s_a, r_a, far.double(), m_b, s_b, m_1, s_1], -1)


def dense_kd_stats(student, teacher, temperature, hard):
    """student, teacher [N, V_slice] -> [N, 8] float64 (DENSE_STATS)."""
    _op_checks.dense_stats(student, teacher, temperature)
    n, vocab = student.shape
    out = student.new_empty(n, len(_ops.DENSE_STATS), dtype=torch.float64)
    step = chunk_rows(vocab)
    for r in range(0, n, step):
        out[r:r + step] = _stats_chunk(student[r:r + step], teacher[r:r + step], temperature, hard)
    return out
