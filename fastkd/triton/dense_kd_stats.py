"""Backend "triton" of the op dense_kd_stats (fastkd/_ops.py): one program per row of a rank's
vocabulary slice, the dense kernel's pass 1 (dense_kd.row_sums) alone. The maxima leave in natural
units (m = m2 ln 2, formed in float64, so the shard kernel's m ln2 -> log2 round trip is exact);
the columns are fastkd/_ops.py's DENSE_STATS."""
import math

import torch
import triton
import triton.language as tl

from .. import _op_checks, _ops
from . import _config
from ._columns import DS_FAR, DS_M_1, DS_M_A, DS_M_B, DS_R_A, DS_S_1, DS_S_A, DS_S_B, DS_WIDTH
from ._math import LN2
from .dense_kd import row_sums


@triton.jit
def _natural(m2):
    """A log2-unit maximum as a float64 natural one (-inf stays -inf)."""
    return m2.to(tl.float64) * LN2


@triton.jit
def _dense_kd_stats_kernel(S, T, OUT, V, stride_s, stride_t, scale2, HARD: tl.constexpr, ACC: tl.constexpr,
                           DEGREE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m_a, s_a, r_a, far, m_b, s_b, m_1, s_1 = row_sums(S + row * stride_s, T + row * stride_t, V, scale2, row >= 0,
                                                      HARD, ACC, DEGREE, BLOCK)
    out = OUT + row * DS_WIDTH
    tl.store(out + DS_M_A, _natural(m_a))
    tl.store(out + DS_S_A, s_a.to(tl.float64))
    tl.store(out + DS_R_A, tl.where(far > 0, 0.0, r_a.to(tl.float64)))  # a far slice: the row is far, r unused
    tl.store(out + DS_FAR, far.to(tl.float64))
    tl.store(out + DS_M_B, _natural(m_b))
    tl.store(out + DS_S_B, s_b.to(tl.float64))
    tl.store(out + DS_M_1, _natural(m_1))
    tl.store(out + DS_S_1, s_1.to(tl.float64))




def dense_kd_stats(student, teacher, temperature, hard):
    """student, teacher [N, V_slice] -> [N, 8] float64 (DENSE_STATS)."""
    _op_checks.dense_stats(student, teacher, temperature)
    n, vocab = student.shape
    out = student.new_empty(n, len(_ops.DENSE_STATS), dtype=torch.float64)
    if n == 0:
        return out
    acc = _ops.acc_dtype(student.dtype)
    s = student if student.stride(-1) == 1 else student.contiguous()
    t = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    args = dict(S=s, T=t, OUT=out, V=vocab, stride_s=s.stride(0), stride_t=t.stride(0),
                scale2=math.log2(math.e) / temperature, HARD=bool(hard),
                ACC=tl.float64 if acc == torch.float64 else tl.float32,
                DEGREE=17 if acc == torch.float64 else 10)
    _config.launch(_dense_kd_stats_kernel, (n,), args, _config.row_config("dense_kd_stats", vocab, student.dtype))
    return out
