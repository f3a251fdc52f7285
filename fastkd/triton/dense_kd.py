"""Backend "triton" of the op dense_kd (fastkd/_ops.py): one program per row.

Pass 1 folds the row's blocks into running (max, sum of exp2) pairs for a = s / T and b = t / T
(log2(e) folded into the scale, fp32 -- fp64 for fp64 logits), and for s at temperature 1 when
there is a hard-label term. Pass 2 forms p, q and the divergence terms (fastkd/triton/_math.py)
and sums D and U = sum u. The gradient g = w_kd (u - q U) + w_hard (softmax(s) - onehot) is
written in the student's dtype: for forward KL in pass 2 itself (U = -sum p = -1), so the inputs
are read twice; for the other divergences by a pass 3 that needs U first.
"""
import math

import torch
import triton
import triton.language as tl

from .. import _op_checks, _ops
from .._math import row_weights
from . import _config
from ._math import (DIVERGENCE_CODES, FORWARD_KL, LN2, LOG2E, NO_LABELS, elem, expm1_near, gradient_u, hard_label_grad,
                    log1p,
                    log2_total, online_update, online_update_weighted)


@triton.jit
def _block_terms(s_row, t_row, offs, mask, scale2, lse_a, lse_b, dl, kd_on, beta, omb, log_beta, log_omb,
                 DIVERGENCE: tl.constexpr, ACC: tl.constexpr):
    """One block of a row: (x = s in ACC, q, term, u); term and u are 0 without a teacher
    distribution (kd_on false). lse_a, lse_b in log2 units, dl = lse(b) - lse(a) in nats."""
    x = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(ACC)
    a2 = x * scale2
    q = tl.exp2(a2 - lse_a)
    b2 = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(ACC) * scale2
    p = tl.exp2(b2 - lse_b)
    term, u = elem(DIVERGENCE, p, q, (b2 - lse_b) * LN2, (a2 - lse_a) * LN2, (b2 - a2) * LN2 - dl,
                   beta, omb, log_beta, log_omb)
    return x, q, tl.where(kd_on, term, 0.0), tl.where(kd_on, u, 0.0)


@triton.jit
def row_sums(s_row, t_row, V, scale2, walk, HARD: tl.constexpr, ACC: tl.constexpr, DEGREE: tl.constexpr,
             BLOCK: tl.constexpr):
    """Pass 1 over a row of V entries (skipped unless `walk`): the running (max, sum of exp2) of
    a = s / T and b = t / T in log2 units (scale2 = log2(e) / T), the close-row sum r_a at m_a and the
    far flag (fastkd/_math.py's close_row_sum), and (max, sum) of s at T = 1 when HARD ->
    (m_a, s_a, r_a, far, m_b, s_b, m_1, s_1); (-inf, 0) pairs for an empty row."""
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    m_a = tl.full((), ninf, ACC)
    s_a = tl.zeros((), ACC)
    r_a = tl.zeros((), ACC)  # sum of exp2(a - m_a) expm1(b - a): kd_math.h's close-row shift
    far = tl.zeros((), tl.int32)
    m_b = tl.full((), ninf, ACC)
    s_b = tl.zeros((), ACC)
    m_1 = tl.full((), ninf, ACC)
    s_1 = tl.zeros((), ACC)
    if walk:
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(s_row + offs, mask=mask, other=ninf).to(ACC)
            y = tl.load(t_row + offs, mask=mask, other=ninf).to(ACC)
            a2 = x * scale2
            b2 = y * scale2
            delta = (b2 - a2) * LN2
            support = b2 > ninf
            far = tl.maximum(far, tl.max(tl.where(support & (tl.abs(delta) >= 1.0), 1, 0), 0))
            em1 = tl.where(support, expm1_near(tl.minimum(tl.maximum(delta, -1.0), 1.0), DEGREE), -1.0)
            m_a, s_a, r_a = online_update_weighted(m_a, s_a, r_a, a2, em1)
            m_b, s_b = online_update(m_b, s_b, b2)
            if HARD:
                m_1, s_1 = online_update(m_1, s_1, x * LOG2E)
    return m_a, s_a, r_a, far, m_b, s_b, m_1, s_1


@triton.jit
def _dense_kd_kernel(S, T, L, LOSS, G, V, stride_s, stride_t, stride_g, scale2, kd_loss_w, kd_grad_w,
                     hard_w, hard_grad_w, ignore_index, beta, omb, log_beta, log_omb,
                     DIVERGENCE: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr,
                     COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, DEGREE: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    g_row = G + row * stride_g
    cols = tl.arange(0, BLOCK)
    label = -1
    if HAS_LABELS:
        label = tl.load(L + row)
    ninf = float("-inf")
    keep = label != ignore_index
    bad_label = label < -1  # false; a kept label outside [0, V) makes the row NaN (no host check on CUDA)
    if HAS_LABELS:
        bad_label = keep & ((label < 0) | (label >= V))
    # 1. running max and sum of exp2 for a, b (and s at T = 1)
    m_a, s_a, r_a, far, m_b, s_b, m_1, s_1 = row_sums(s_row, t_row, V, scale2, keep & (bad_label == 0), HARD, ACC,
                                                      DEGREE, BLOCK)
    lse_a = log2_total(m_a, s_a)  # log2 units
    lse_b = log2_total(m_b, s_b)
    # a NaN or +inf logit makes its running sum NaN: the row is NaN (docs/math.md)
    numbers = (s_a == s_a) & (s_b == s_b) & (s_1 == s_1) & (bad_label == 0)
    poison = keep & (numbers == 0)
    live = keep & (m_a > ninf) & numbers  # a kept row with a student distribution
    kd_on = live & (m_b > ninf)  # ... and a teacher distribution
    # lse(b) - lse(a), natural units: log1p(R) for a close row, else the difference
    dl = tl.where(kd_on, tl.where(far == 0, log1p(r_a / s_a), (lse_b - lse_a) * LN2), 0.0)
    ce = tl.zeros((), ACC)
    lse_1 = log2_total(m_1, s_1)
    if HARD:
        if live:
            ce = lse_1 * LN2 - tl.load(s_row + label).to(ACC)
    # 2. the divergence sums (and, for forward KL, the gradient)
    d_acc = tl.zeros((BLOCK,), ACC)
    u_acc = tl.zeros((BLOCK,), ACC)
    if live:
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x, q, term, u = _block_terms(s_row, t_row, offs, mask, scale2, lse_a, lse_b, dl, kd_on, beta, omb,
                                         log_beta, log_omb, DIVERGENCE, ACC)
            d_acc += tl.where(mask, term, 0.0)
            u_acc += tl.where(mask, u, 0.0)
            if COMPUTE_GRAD:
                if DIVERGENCE == FORWARD_KL:
                    g = kd_grad_w * tl.where(kd_on, u + q, 0.0)
                    if HARD:
                        g += hard_grad_w * hard_label_grad(x, offs, label, lse_1)
                    tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)
    big_d = tl.sum(d_acc, 0)
    big_u = gradient_u(tl.sum(u_acc, 0))
    big_d = tl.where(big_d < 0, 0.0, big_d)  # a divergence is >= 0; rounding may dip below
    tl.store(LOSS + row, tl.where(poison, float("nan"), tl.where(live, kd_loss_w * big_d + hard_w * ce, 0.0)))
    # 3. the gradient, for the divergences whose U is only known now
    if COMPUTE_GRAD:
        if (DIVERGENCE != FORWARD_KL) | (live == 0):
            for start in range(0, V, BLOCK):
                offs = start + cols
                mask = offs < V
                g = tl.zeros((BLOCK,), ACC)
                if live:
                    x, q, term, u = _block_terms(s_row, t_row, offs, mask, scale2, lse_a, lse_b, dl, kd_on, beta,
                                                 omb, log_beta, log_omb, DIVERGENCE, ACC)
                    g = tl.where(kd_on, kd_grad_w * (u - q * big_u), 0.0)
                    if HARD:
                        g += hard_grad_w * hard_label_grad(x, offs, label, lse_1)
                if poison:
                    g = tl.full((BLOCK,), float("nan"), ACC)
                tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


MIXED = (DIVERGENCE_CODES["jsd"], DIVERGENCE_CODES["skew_forward_kl"], DIVERGENCE_CODES["skew_reverse_kl"])


def _kind(divergence_code: int) -> str:
    """The launch-shape row of _config.MAX_BLOCK: the divergences through a mixture take more registers."""
    return "dense_kd_mixed" if divergence_code in MIXED else "dense_kd"


_tuned = _config.autotuned(_dense_kd_kernel, lambda args: _kind(args["DIVERGENCE"]), key=("V", "DIVERGENCE"))


def dense_kd(student, teacher, labels, divergence, temperature, beta, ignore_index, hard_weight,
             scale_by_t2, grad_scale, compute_grad):
    """student, teacher [N, V] -> (loss [N], grad [N, V] or empty); see fastkd/_ops.py."""
    _op_checks.row_loss("dense_kd", student, labels, temperature, ignore_index, hard_weight)
    _op_checks.dense(student, teacher, divergence, beta)
    n, vocab = student.shape
    acc = _ops.acc_dtype(student.dtype)
    s = student if student.stride(-1) == 1 else student.contiguous()
    t = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    loss, grad = _ops.row_loss_outputs(s, compute_grad)
    if n == 0 or vocab == 0:
        return loss.zero_(), grad.zero_() if compute_grad else grad
    w = row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    args = dict(S=s, T=t, L=labels if labels is not None else s, LOSS=loss, G=grad if compute_grad else s,
                V=vocab, stride_s=s.stride(0), stride_t=t.stride(0), stride_g=vocab,
                scale2=math.log2(math.e) / temperature, kd_loss_w=w.kd_loss, kd_grad_w=w.kd_grad,
                hard_w=w.hard, hard_grad_w=w.hard_grad,
                ignore_index=ignore_index if labels is not None else NO_LABELS, beta=beta,
                omb=1.0 - beta, log_beta=math.log(beta) if beta > 0 else -math.inf,
                log_omb=math.log1p(-beta) if beta < 1 else -math.inf,
                DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_LABELS=labels is not None,
                HARD=hard_weight > 0, COMPUTE_GRAD=compute_grad,
                ACC=tl.float64 if acc == torch.float64 else tl.float32,
                DEGREE=17 if acc == torch.float64 else 10)
    kind = _kind(args["DIVERGENCE"])
    _config.launch(_dense_kd_kernel, (n,), args, _config.row_config(kind, vocab, student.dtype), _tuned, kind)
    return loss, grad
