"""Backend "triton" of the op sparse_kd (fastkd/_ops.py): one program per row.

The launcher sorts each row's teacher ids ascending (padding -- logprob -inf -- last, as id V), so
a kernel pass walks the row's blocks and the ids together: a pointer into the sorted ids marks
which lanes of a block lie in I. Pass 1 folds the tail (the lanes outside I) into a running
(max, sum of exp2), the tail's own maximum, and s at T = 1 for a hard-label term; lse_in and
log P come from the k ids directly. The loss and the gradient's coefficients are
csrc/sparse_math.h's (fastkd/triton/_math.py); pass 2 writes the gradient. The student is read
twice and the gradient written once.
"""

import torch
import triton
import triton.language as tl

from .. import _op_checks, _ops
from .._math import TAILS, row_weights
from . import _config
from ._math import (LN2, LOG2E, NO_LABELS, TAIL_CODES, exp_below, hard_label_grad, log2_total, logaddexp,
                    online_update, sparse_term, tail_coefficients)


@triton.jit
def _sparse_kd_kernel(S, IDX, LP, TAIL, L, LOSS, G, V, K, stride_s, stride_g, inv_t, kd_loss_w, kd_grad_w,
                      hard_w, hard_grad_w, ignore_index, TAIL_MODE: tl.constexpr, HAS_LABELS: tl.constexpr,
                      HARD: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr,
                      K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    g_row = G + row * stride_g
    id_row = IDX + row * K
    lp_row = LP + row * K
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    label = -1
    if HAS_LABELS:
        label = tl.load(L + row)
    keep = label != ignore_index
    # the teacher's entries: sorted ids (padding: id V, logprob -inf)
    c = tl.arange(0, K_PAD)
    lp = tl.load(lp_row + c, mask=c < K, other=ninf).to(ACC)
    ids = tl.load(id_row + c, mask=c < K, other=V)
    known = lp > ninf
    in_range = (ids >= 0) & (ids < V)
    # what the host checks on CPU tensors, here a NaN row: a real id outside [0, V), a log-prob
    # above 0 (raw logits?) -- and, below, a repeated id
    bad = tl.sum((known & (in_range == 0)).to(tl.int32), 0) + tl.sum((lp > 1e-3).to(tl.int32), 0)
    known = known & in_range
    a_in = tl.where(known, tl.load(s_row + tl.where(known, ids, 0), mask=known, other=ninf).to(ACC) * inv_t, ninf)
    m_p = tl.max(lp, 0)
    log_p = tl.where(m_p > ninf, m_p + tl.log(tl.sum(tl.exp(lp - tl.where(m_p > ninf, m_p, 0.0)), 0)), ninf)
    m_in = tl.max(a_in, 0)
    lse_in = tl.where(m_in > ninf, m_in + tl.log(tl.sum(tl.exp(a_in - tl.where(m_in > ninf, m_in, 0.0)), 0)), ninf)
    # 1. the tail's running max and sum (lanes outside I), and s at T = 1
    m_t = tl.full((), ninf, ACC)
    s_t = tl.zeros((), ACC)
    m_a = tl.full((), ninf, ACC)
    s_a = tl.zeros((), ACC)
    m_1 = tl.full((), ninf, ACC)
    s_1 = tl.zeros((), ACC)
    if keep:
        ptr = 0
        last = tl.full((), -1, tl.int64)  # ids are int64: a loop-carried value keeps its type
        nxt = tl.load(id_row, mask=K > 0, other=V)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            in_i = offs < 0
            while (nxt < start + BLOCK) & (nxt < V):
                in_i = in_i | (offs == nxt)
                bad += (nxt == last).to(tl.int32)
                last = nxt
                ptr += 1
                nxt = tl.load(id_row + ptr, mask=ptr < K, other=V)
            x = tl.load(s_row + offs, mask=mask, other=ninf).to(ACC)
            a2 = x * (inv_t * LOG2E)
            m_a, s_a = online_update(m_a, s_a, a2)
            m_t, s_t = online_update(m_t, s_t, tl.where(in_i, ninf, a2))
            if HARD:
                m_1, s_1 = online_update(m_1, s_1, x * LOG2E)
    tail_lp = tl.load(TAIL + row).to(ACC)
    # a NaN or +inf logit makes its running sum NaN, a NaN logprob log P: the row is NaN
    numbers = (s_a == s_a) & (log_p == log_p) & (tail_lp == tail_lp) & (bad == 0) & (tail_lp <= 1e-3)
    poison = keep & (numbers == 0)
    live = keep & (m_a > ninf) & numbers
    lse_tail = log2_total(m_t, s_t) * LN2
    lse_all = logaddexp(lse_in, lse_tail)
    lse_all = tl.where(live, lse_all, 0.0)
    shift, norm, extra, in_scale, in_norm, out_scale, tail_scale = tail_coefficients(
        TAIL_MODE, lse_all, lse_in, lse_tail, log_p, tail_lp)
    kd = tl.sum(sparse_term(lp, a_in, shift, norm), 0) + extra
    kd = tl.where(kd < 0, 0.0, kd)  # a divergence is >= 0; rounding may dip below
    lse_1 = log2_total(m_1, s_1)
    ce = tl.zeros((), ACC)
    if HARD:
        if live:
            ce = lse_1 * LN2 - tl.load(s_row + label).to(ACC)
    tl.store(LOSS + row, tl.where(poison, float("nan"), tl.where(live, kd_loss_w * kd + hard_w * ce, 0.0)))
    # 2. the gradient: in_scale exp(a - in_norm) - t on I; out_scale q - tail_scale q / r_q outside
    if COMPUTE_GRAD:
        ptr = 0
        nxt = tl.load(id_row, mask=K > 0, other=V)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            g = tl.zeros((BLOCK,), ACC)
            if live:
                in_i = offs < 0
                target = tl.zeros((BLOCK,), ACC)
                while (nxt < start + BLOCK) & (nxt < V):
                    hit = offs == nxt
                    in_i = in_i | hit
                    target = tl.where(hit, tl.exp(tl.load(lp_row + ptr).to(ACC) - shift), target)
                    ptr += 1
                    nxt = tl.load(id_row + ptr, mask=ptr < K, other=V)
                x = tl.load(s_row + offs, mask=mask, other=ninf).to(ACC)
                a = x * inv_t
                inside = in_scale * exp_below(a, in_norm) - target
                outside = out_scale * exp_below(a, lse_all) - tail_scale * exp_below(a, lse_tail)
                g = kd_grad_w * tl.where(in_i, inside, outside)
                if HARD:
                    g += hard_grad_w * hard_label_grad(x, offs, label, lse_1)
            if poison:
                g = tl.full((BLOCK,), float("nan"), ACC)
            tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)


_tuned = _config.autotuned(_sparse_kd_kernel, lambda args: "sparse_kd")


def sparse_kd(student, indices, logprobs, tail_logmass, labels, tail, temperature, ignore_index,
              hard_weight, scale_by_t2, grad_scale, compute_grad):
    """student [N, V], indices/logprobs [N, k], tail_logmass [N] -> (loss [N], grad [N, V])."""
    _op_checks.row_loss("sparse_kd", student, labels, temperature, ignore_index, hard_weight)
    _op_checks.sparse(student, indices, logprobs, tail_logmass)
    if tail not in TAILS:
        raise ValueError(f"fastkd::sparse_kd: unknown tail '{tail}'")
    n, vocab = student.shape
    k = indices.shape[-1]
    acc = _ops.acc_dtype(student.dtype)
    s = student if student.stride(-1) == 1 else student.contiguous()
    loss, grad = _ops.row_loss_outputs(s, compute_grad)
    if n == 0 or vocab == 0:
        return loss.zero_(), grad.zero_() if compute_grad else grad
    # ids ascending, padding last as id V (never walked): a [N, k] sort, no host sync
    key = torch.where(logprobs > float("-inf"), indices, vocab)
    ids, order = key.sort(-1)
    lp = logprobs.gather(-1, order).contiguous()
    w = row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    args = dict(S=s, IDX=ids.contiguous(), LP=lp, TAIL=tail_logmass.contiguous(),
                L=labels if labels is not None else s, LOSS=loss, G=grad if compute_grad else s,
                V=vocab, K=k, stride_s=s.stride(0), stride_g=vocab, inv_t=1.0 / temperature,
                kd_loss_w=w.kd_loss, kd_grad_w=w.kd_grad, hard_w=w.hard, hard_grad_w=w.hard_grad,
                ignore_index=ignore_index if labels is not None else NO_LABELS, TAIL_MODE=TAIL_CODES[tail],
                HAS_LABELS=labels is not None,
                HARD=hard_weight > 0, COMPUTE_GRAD=compute_grad,
                ACC=tl.float64 if acc == torch.float64 else tl.float32, K_PAD=triton.next_power_of_2(max(k, 1)))
    _config.launch(_sparse_kd_kernel, (n,), args, _config.row_config("sparse_kd", vocab, student.dtype), _tuned,
                   "sparse_kd")
    return loss, grad
