"""Backend "triton" of the op dense_kd_finish (fastkd/_ops.py): one program per row, in place: one
read of the student and of dense_kd_shard's gradient (made with U = 0), one write of grad - w U q
with the row's U from the statistics (DENSE_ROW); rows with a NaN statistic, no student or no
teacher distribution are left as they are."""
import math

import torch
import triton
import triton.language as tl

from .. import _op_checks, _ops
from . import _config
from ._columns import DR_LOG_S_A, DR_M_A, DR_M_B, DR_U, DR_WIDTH
from ._math import gradient_u
from .dense_kd_shard import column, load_row_stats, log2_lse


@triton.jit
def _dense_kd_finish_kernel(S, R, G, V, stride_s, scale2, kd_grad_w, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    g_row = G + row * V
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    st, poisoned = load_row_stats(R, row, DR_WIDTH)
    m_a = column(st, DR_M_A, DR_WIDTH)
    ok = (poisoned == 0) & (m_a > ninf) & (column(st, DR_M_B, DR_WIDTH) > ninf)
    lse_a = log2_lse(m_a, column(st, DR_LOG_S_A, DR_WIDTH), ok).to(ACC)
    coef = tl.where(ok, kd_grad_w * gradient_u(column(st, DR_U, DR_WIDTH)), 0.0).to(ACC)
    if ok:
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            g = tl.load(g_row + offs, mask=mask, other=0.0).to(ACC)
            x = tl.load(s_row + offs, mask=mask, other=ninf).to(ACC)
            g -= coef * tl.exp2(x * scale2 - lse_a)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


def dense_kd_finish(grad, student, row_stats, temperature, kd_grad_weight):
    """grad [N, V_slice] (dense_kd_shard's, with U = 0; contiguous), student [N, V_slice],
    row_stats [N, 8] float64 (DENSE_ROW with the row's U): grad -= kd_grad_weight * gradient_u(U) * q
    in place, where q = exp(s / T - m_a - log_s_a)."""
    _op_checks.finish("dense_kd_finish", grad, student, row_stats, temperature)
    n, vocab = student.shape
    if n == 0:
        return
    acc = _ops.acc_dtype(student.dtype)
    s = student if student.stride(-1) == 1 else student.contiguous()
    args = dict(S=s, R=row_stats.contiguous(), G=grad, V=vocab, stride_s=s.stride(0),
                scale2=math.log2(math.e) / temperature, kd_grad_w=float(kd_grad_weight),
                ACC=tl.float64 if acc == torch.float64 else tl.float32)
    _config.launch(_dense_kd_finish_kernel, (n,), args, _config.row_config("dense_kd_finish", vocab, student.dtype))
