"""Backend "torch" of the op dense_kd_finish (fastkd/_ops.py): the last step of the vocab-parallel
dense gradient for the divergences whose gradient needs the whole row's U (all but forward KL).
dense_kd_shard, called once with U = 0, returns w_kd u + the hard-label part; once the ranks have
summed U, this subtracts w_kd U q from it in place -- one exp a column, where a second
dense_kd_shard would evaluate the divergence's terms again."""
import torch

from .. import _math, _op_checks, _ops
from ._rows import NEG_INF, chunk_rows


def dense_kd_finish(grad, student, row_stats, temperature, kd_grad_weight):
    """grad [N, V_slice] (dense_kd_shard's, with U = 0), student [N, V_slice], row_stats [N, 8]
    float64 (DENSE_ROW with the row's U): grad -= kd_grad_weight * gradient_u(U) * q in place, where
    q = exp(s / T - m_a - log_s_a); rows with a NaN statistic, no student or no teacher
    distribution are left as they are."""
    _op_checks.finish("dense_kd_finish", grad, student, row_stats, temperature)
    acc = _ops.acc_dtype(student.dtype)
    step = chunk_rows(student.shape[1])
    for r in range(0, student.shape[0], step):
        rows = slice(r, r + step)
        m_a, log_s_a, m_b, _, _, _, _, u = row_stats[rows].split(1, -1)
        ok = ~row_stats[rows].isnan().any(-1, keepdim=True) & (m_a > NEG_INF) & (m_b > NEG_INF)
        coef = torch.where(ok, kd_grad_weight * _math.gradient_u(u), 0.0)
        a = student[rows].to(acc) * (1.0 / temperature)
        q = torch.where(ok, (a - torch.where(ok, m_a + log_s_a, 0.0).to(acc)).exp(), 0.0)
        grad[rows] = (grad[rows].to(acc) - coef.to(acc) * q).to(grad.dtype)
