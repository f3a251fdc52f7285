"""Backend "triton" of the op sparse_kd_shard (fastkd/_ops.py): one program per row of a rank's
vocabulary slice, given the whole row's tail coefficients (SPARSE_ROW, float64). One pass walks
the row's blocks and its sorted teacher ids together (sparse_kd_stats.walk_ids) and writes the
slice's gradient, the math of fastkd/_math.py's sparse teacher:

    w_kd dloss/da_j = in_scale exp(a_j - in_norm) - t_j                              j in I
                    = out_scale exp(a_j - lse_all) - tail_scale exp(a_j - lse_tail)  j not in I

plus w_hard (softmax(s) - onehot) for hard labels."""
import torch
import triton
import triton.language as tl

from .. import _op_checks, _ops
from .._math import row_weights
from . import _config
from ._columns import (SR_IN_NORM, SR_IN_SCALE, SR_LSE_1, SR_LSE_ALL, SR_LSE_TAIL, SR_OUT_SCALE, SR_SHIFT,
                       SR_TAIL_SCALE, SR_WIDTH)
from ._math import LOG2E, exp_below, hard_label_grad
from .dense_kd_shard import column, load_row_stats, slice_label
from .sparse_kd_stats import sorted_slice_ids, walk_ids


@triton.jit
def _sparse_kd_shard_kernel(S, IDX, LP, L, R, G, V, K, stride_s, stride_g, inv_t, kd_grad_w, hard_grad_w,
                            ignore_index, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    g_row = G + row * stride_g
    id_row = IDX + row * K
    lp_row = LP + row * K
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    label, kept = slice_label(L, row, ignore_index, HAS_LABELS)
    st, poisoned = load_row_stats(R, row, SR_WIDTH)
    # SPARSE_ROW: shift, in_scale, in_norm, out_scale, lse_all, tail_scale, lse_tail, lse_1
    lse_all = column(st, SR_LSE_ALL, SR_WIDTH)
    live = (lse_all > ninf) & (poisoned == 0)
    shift = tl.where(live, column(st, SR_SHIFT, SR_WIDTH), 0.0).to(ACC)
    in_scale = tl.where(live, column(st, SR_IN_SCALE, SR_WIDTH), 0.0).to(ACC)
    in_norm = column(st, SR_IN_NORM, SR_WIDTH).to(ACC)
    out_scale = tl.where(live, column(st, SR_OUT_SCALE, SR_WIDTH), 0.0).to(ACC)
    tail_scale = tl.where(live, column(st, SR_TAIL_SCALE, SR_WIDTH), 0.0).to(ACC)
    lse_tail = column(st, SR_LSE_TAIL, SR_WIDTH).to(ACC)
    lse_1 = tl.where(live, column(st, SR_LSE_1, SR_WIDTH) * LOG2E, 0.0).to(ACC)  # log2 units, for hard_label_grad
    lse_all = lse_all.to(ACC)
    ptr = 0
    nxt = tl.load(id_row, mask=K > 0, other=V)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        g = tl.zeros((BLOCK,), ACC)
        if live:
            in_i, target, ptr, nxt = walk_ids(id_row, lp_row, K, V, ptr, nxt, start, offs, shift, True, ACC, BLOCK)
            x = tl.load(s_row + offs, mask=mask, other=ninf).to(ACC)
            a = x * inv_t
            inside = in_scale * exp_below(a, in_norm)
            outside = out_scale * exp_below(a, lse_all) - tail_scale * exp_below(a, lse_tail)
            g = kd_grad_w * (tl.where(in_i, inside, outside) - target)
            if HARD:
                g += hard_grad_w * hard_label_grad(x, offs, label, lse_1)
        g = tl.where(kept, tl.where(poisoned, float("nan"), g), 0.0)
        tl.store(g_row + offs, g.to(G.dtype.element_ty), mask=mask)




def sparse_kd_shard(student, indices, logprobs, labels, row_stats, temperature, ignore_index, hard_weight,
                    scale_by_t2, grad_scale):
    """student [N, V_slice], indices/logprobs [N, k] (global ids less the slice's start), labels
    [N] (ids of this slice; others: another slice's), row_stats [N, 8] float64 (SPARSE_ROW) ->
    grad [N, V_slice] in _ops.grad_dtype."""
    _op_checks.sparse_shard(student, indices, logprobs, labels, row_stats, temperature, ignore_index)
    n, vocab = student.shape
    _, grad = _ops.row_loss_outputs(student, True)
    if n == 0 or vocab == 0:
        return grad
    acc = _ops.acc_dtype(student.dtype)
    s = student if student.stride(-1) == 1 else student.contiguous()
    ids, lp = sorted_slice_ids(indices, logprobs, vocab)
    w = row_weights(temperature, hard_weight, scale_by_t2, grad_scale)
    args = dict(S=s, IDX=ids, LP=lp, L=labels if labels is not None else s, R=row_stats.contiguous(), G=grad,
                V=vocab, K=indices.shape[-1], stride_s=s.stride(0), stride_g=vocab, inv_t=1.0 / temperature,
                kd_grad_w=w.kd_grad, hard_grad_w=w.hard_grad, ignore_index=ignore_index, HAS_LABELS=labels is not None,
                HARD=hard_weight > 0, ACC=tl.float64 if acc == torch.float64 else tl.float32)
    _config.launch(_sparse_kd_shard_kernel, (n,), args, _config.row_config("sparse_kd_shard", vocab, student.dtype))
    return grad
