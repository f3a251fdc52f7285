"""Backend "triton" of the op dense_kd_shard (fastkd/_ops.py): one program per row of a rank's
vocabulary slice, given the whole row's statistics (DENSE_ROW, natural units, float64). One pass
forms p, q and the divergence terms with the dense kernel's _block_terms, sums the slice's shares
of D and U, and writes the slice's gradient w_kd (u - q U) + w_hard (softmax(s) - onehot) with the
row's U from the statistics (forward KL: -1; the others: 0 before dense_kd_finish, or the summed U)."""
import math

import torch
import triton
import triton.language as tl

from .. import _op_checks, _ops
from .._math import row_weights
from . import _config
from ._columns import DR_DL, DR_LOG_S_1, DR_LOG_S_A, DR_LOG_S_B, DR_M_1, DR_M_A, DR_M_B, DR_U, DR_WIDTH
from ._math import DIVERGENCE_CODES, LOG2E, gradient_u, hard_label_grad
from .dense_kd import _block_terms, _kind


@triton.jit
def slice_label(L, row, ignore_index, HAS_LABELS: tl.constexpr):
    """(label, kept) of a row of a partial-form op: its label in the slice's ids and whether the
    row counts (without labels: -1, and every row counts)."""
    label = -1
    kept = row >= 0
    if HAS_LABELS:
        label = tl.load(L + row)
        kept = label != ignore_index
    return label, kept


@triton.jit
def load_row_stats(R, row, NCOL: tl.constexpr):
    """The row's statistics R[row, :NCOL] (float64) and whether any is NaN (the row read a NaN or
    +inf on some rank)."""
    c = tl.arange(0, NCOL)
    st = tl.load(R + row * NCOL + c)
    return st, tl.sum((st != st).to(tl.int32), 0) > 0


@triton.jit
def column(st, j: tl.constexpr, NCOL: tl.constexpr):
    """Column j of a row of statistics loaded by load_row_stats."""
    return tl.sum(tl.where(tl.arange(0, NCOL) == j, st, 0.0), 0)


@triton.jit
def log2_lse(m, log_s, ok):
    """(m + log s) in log2 units, float64 before rounding to the kernel's accumulator; 0 where not ok."""
    return tl.where(ok, (tl.where(ok, m, 0.0) + tl.where(ok, log_s, 0.0)) * LOG2E, 0.0)


@triton.jit
def _dense_kd_shard_kernel(S, T, L, R, PARTS, G, V, stride_s, stride_t, stride_g, scale2, kd_grad_w, hard_grad_w,
                           ignore_index, beta, omb, log_beta, log_omb, DIVERGENCE: tl.constexpr,
                           HAS_LABELS: tl.constexpr, HARD: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    g_row = G + row * stride_g
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    label, kept = slice_label(L, row, ignore_index, HAS_LABELS)
    st, poisoned = load_row_stats(R, row, DR_WIDTH)
    m_a = column(st, DR_M_A, DR_WIDTH)
    m_b = column(st, DR_M_B, DR_WIDTH)
    live = (m_a > ninf) & (poisoned == 0)
    kd_on = live & (m_b > ninf)
    lse_a = log2_lse(m_a, column(st, DR_LOG_S_A, DR_WIDTH), live).to(ACC)
    lse_b = log2_lse(m_b, column(st, DR_LOG_S_B, DR_WIDTH), kd_on).to(ACC)
    dl = tl.where(kd_on, column(st, DR_DL, DR_WIDTH), 0.0).to(ACC)
    lse_1 = log2_lse(column(st, DR_M_1, DR_WIDTH), column(st, DR_LOG_S_1, DR_WIDTH), live).to(ACC)
    big_u = gradient_u(column(st, DR_U, DR_WIDTH)).to(ACC)
    d_acc = tl.zeros((BLOCK,), ACC)
    u_acc = tl.zeros((BLOCK,), ACC)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        g = tl.zeros((BLOCK,), ACC)
        if live:
            x, q, term, u = _block_terms(s_row, t_row, offs, mask, scale2, lse_a, lse_b, dl, kd_on, beta, omb,
                                         log_beta, log_omb, DIVERGENCE, ACC)
            d_acc += tl.where(mask, term, 0.0)
            u_acc += tl.where(mask, u, 0.0)
            if COMPUTE_GRAD:
                g = tl.where(kd_on, kd_grad_w * (u - q * big_u), 0.0)
                if HARD:
                    g += hard_grad_w * hard_label_grad(x, offs, label, lse_1)
        if COMPUTE_GRAD:
            g = tl.where(kept, tl.where(poisoned, float("nan"), g), 0.0)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)
    nan = float("nan")
    d = tl.where(kept, tl.where(poisoned, nan, tl.sum(d_acc, 0).to(tl.float64)), 0.0)
    u = tl.where(kept, tl.where(poisoned, nan, tl.sum(u_acc, 0).to(tl.float64)), 0.0)
    tl.store(PARTS + row * 2, d)
    tl.store(PARTS + row * 2 + 1, u)


def _shard_kind(divergence_code: int) -> str:
    """The launch-shape row of _config.MAX_BLOCK, as dense_kd's _kind."""
    return _kind(divergence_code).replace("dense_kd", "dense_kd_shard")




def dense_kd_shard(student, teacher, labels, row_stats, divergence, temperature, beta, ignore_index,
                   hard_weight, scale_by_t2, grad_scale, compute_grad):
    """student, teacher [N, V_slice], labels [N] (ids of this slice; others: another slice's),
    row_stats [N, 8] float64 (DENSE_ROW) -> (parts [N, 2] float64 (D, U shares), grad [N, V_slice]
    or empty)."""
    _op_checks.dense_shard(student, teacher, labels, row_stats, divergence, temperature, beta, ignore_index)
    n, vocab = student.shape
    parts = student.new_empty(n, 2, dtype=torch.float64)
    _, grad = _ops.row_loss_outputs(student, compute_grad)
    if n == 0:
        return parts, grad
    acc = _ops.acc_dtype(student.dtype)
    s = student if student.stride(-1) == 1 else student.contiguous()
    t = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    w = row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    code = DIVERGENCE_CODES[divergence]
    args = dict(S=s, T=t, L=labels if labels is not None else s, R=row_stats.contiguous(), PARTS=parts,
                G=grad if compute_grad else s, V=vocab, stride_s=s.stride(0), stride_t=t.stride(0), stride_g=vocab,
                scale2=math.log2(math.e) / temperature, kd_grad_w=w.kd_grad, hard_grad_w=w.hard_grad,
                ignore_index=ignore_index, beta=beta, omb=1.0 - beta,
                log_beta=math.log(beta) if beta > 0 else -math.inf,
                log_omb=math.log1p(-beta) if beta < 1 else -math.inf,
                DIVERGENCE=code, HAS_LABELS=labels is not None, HARD=hard_weight > 0, COMPUTE_GRAD=compute_grad,
                ACC=tl.float64 if acc == torch.float64 else tl.float32)
    kind = _shard_kind(code)
    _config.launch(_dense_kd_shard_kernel, (n,), args, _config.row_config(kind, vocab, student.dtype))
    return parts, grad
