"""Backend "triton" of the op sparse_kd_stats (fastkd/_ops.py): one program per row of a rank's
vocabulary slice. The launcher sorts the slice's teacher ids (those in [0, V_slice) with a finite
log-prob) ascending, the rest last as id V_slice, as sparse_kd's does; one pass walks the row's
blocks and the ids together (walk_ids) and folds a = s / T on the ids of I and off them, and s at
T = 1, into running (max, sum of exp2). The columns are fastkd/_ops.py's SPARSE_STATS, the maxima
in natural units."""
import torch
import triton
import triton.language as tl

from .. import _op_checks, _ops
from . import _config
from ._columns import SS_M_1, SS_M_IN, SS_M_OUT, SS_S_1, SS_S_IN, SS_S_OUT, SS_WIDTH
from ._math import LOG2E, online_update
from .dense_kd_stats import _natural


@triton.jit
def walk_ids(id_row, lp_row, K, V, ptr, nxt, start, offs, shift, TARGET: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    """Advance over the sorted ids that fall in the block [start, start + BLOCK) -> (in_i: the
    block's lanes in I, target: sum of exp(lp - shift) over each lane's ids when TARGET (a repeated
    id adds up, as the reference's scatter_add does), the next id's position and value)."""
    in_i = offs < 0
    target = tl.zeros((BLOCK,), ACC)
    while (nxt < start + BLOCK) & (nxt < V):
        hit = offs == nxt
        in_i = in_i | hit
        if TARGET:
            target += tl.where(hit, tl.exp(tl.load(lp_row + ptr).to(ACC) - shift), 0.0)
        ptr += 1
        nxt = tl.load(id_row + ptr, mask=ptr < K, other=V)
    return in_i, target, ptr, nxt


@triton.jit
def _sparse_kd_stats_kernel(S, IDX, LP, OUT, V, K, stride_s, inv_t, HARD: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    id_row = IDX + row * K
    lp_row = LP + row * K
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    m_in = tl.full((), ninf, ACC)
    s_in = tl.zeros((), ACC)
    m_out = tl.full((), ninf, ACC)
    s_out = tl.zeros((), ACC)
    m_1 = tl.full((), ninf, ACC)
    s_1 = tl.zeros((), ACC)
    ptr = 0
    nxt = tl.load(id_row, mask=K > 0, other=V)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        in_i, _, ptr, nxt = walk_ids(id_row, lp_row, K, V, ptr, nxt, start, offs, 0.0, False, ACC, BLOCK)
        x = tl.load(s_row + offs, mask=mask, other=ninf).to(ACC)
        a2 = x * (inv_t * LOG2E)
        m_in, s_in = online_update(m_in, s_in, tl.where(in_i, a2, ninf))
        m_out, s_out = online_update(m_out, s_out, tl.where(in_i, ninf, a2))
        if HARD:
            m_1, s_1 = online_update(m_1, s_1, x * LOG2E)
    out = OUT + row * SS_WIDTH
    tl.store(out + SS_M_IN, _natural(m_in))
    tl.store(out + SS_S_IN, s_in.to(tl.float64))
    tl.store(out + SS_M_OUT, _natural(m_out))
    tl.store(out + SS_S_OUT, s_out.to(tl.float64))
    tl.store(out + SS_M_1, _natural(m_1))
    tl.store(out + SS_S_1, s_1.to(tl.float64))


def sorted_slice_ids(indices, logprobs, vocab):
    """(ids, logprobs) [N, k] contiguous: the teacher's ids of this slice -- in [0, vocab), finite
    log-prob -- ascending, the others last as id `vocab`, with their log-probs (a sort, no host sync)."""
    here = (logprobs > float("-inf")) & (indices >= 0) & (indices < vocab)
    ids, order = torch.where(here, indices, vocab).sort(-1)
    return ids.contiguous(), logprobs.gather(-1, order).contiguous()




def sparse_kd_stats(student, indices, logprobs, temperature, hard):
    """student [N, V_slice], indices/logprobs [N, k] (global ids less the slice's start) ->
    [N, 6] float64 (SPARSE_STATS)."""
    _op_checks.sparse_stats(student, indices, logprobs, temperature)
    n, vocab = student.shape
    out = student.new_empty(n, len(_ops.SPARSE_STATS), dtype=torch.float64)
    if n == 0:
        return out
    acc = _ops.acc_dtype(student.dtype)
    s = student if student.stride(-1) == 1 else student.contiguous()
    ids, lp = sorted_slice_ids(indices, logprobs, vocab)
    args = dict(S=s, IDX=ids, LP=lp, OUT=out, V=vocab, K=indices.shape[-1], stride_s=s.stride(0),
                inv_t=1.0 / temperature, HARD=bool(hard), ACC=tl.float64 if acc == torch.float64 else tl.float32)
    _config.launch(_sparse_kd_stats_kernel, (n,), args, _config.row_config("sparse_kd_stats", vocab, student.dtype))
    return out
