"""Backend "triton" of the op topk_teacher (fastkd/_ops.py): one program per row.

A radix select, as the CUDA kernel does: each entry's value becomes an unsigned key that orders
like it (16 bits -- the logit's own -- for bf16/fp16, whose scaled fp32 values order alike; else
32 bits of the scaled fp32 value), and KEY_BITS / 8 passes over the row, each a 256-bin histogram
of the next 8 bits among the keys that match the bits decided so far, find the k-th largest key
and how many keys equal to it are kept (the smallest ids, as ties go on every backend). A
gather pass then writes the kept entries -- keys above the k-th, and those equal ones -- in id
order, and sums the tail (every other entry) at its own maximum; the k kept entries are then
ranked (value descending, then id) against each other and stored in that order. Log-probs are
a_i - log Z with Z = the kept entries' sum + the tail's, never 1 - sum of the top k. Nothing is
sorted on more than k entries, so a compile costs the same for every k.
"""
import torch
import triton
import triton.language as tl

from .. import _op_checks
from . import _config
from ._math import LN2, LOG2E, log2_total, online_update

MAX_K = 1024  # as the CUDA backend; the final ranking compares the k kept entries pairwise


@triton.jit
def _radix_key(x, scale, KEY_BITS: tl.constexpr):
    """(a = x / T in fp32, the unsigned key of x that orders like a: bits made order-preserving)."""
    a = x.to(tl.float32) * scale
    if KEY_BITS == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFF)  # orders like x, in [-32768, 32767]
        key = (ordered + 32768).to(tl.uint32)
    else:
        bits = a.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = ordered.to(tl.uint32, bitcast=True) ^ 0x80000000
    return a, key


@triton.jit
def _topk_teacher_kernel(X, IDX, LP, TAIL, V, k, stride_x, scale, KEY_BITS: tl.constexpr, K_PAD: tl.constexpr,
                         J: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    idx_row = IDX + row * k
    lp_row = LP + row * k
    cols = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    ninf = float("-inf")
    # 1. the k-th largest key, 8 bits a pass; `need`: how many of the keys matching `prefix` are kept
    prefix = tl.zeros((), tl.uint32)
    need = k
    for p in tl.static_range(KEY_BITS // 8):
        shift = KEY_BITS - 8 * (p + 1)
        hist = tl.zeros((256,), tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            x = tl.load(x_row + offs, mask=mask, other=0.0)
            a, key = _radix_key(x, scale, KEY_BITS)
            if p > 0:
                mask = mask & ((key >> (shift + 8)) == prefix)
            digit = ((key >> shift) & 0xFF).to(tl.int32)
            hist += tl.histogram(tl.where(mask, digit, 0), 256, mask=mask)
        # ge[b]: keys (matching the prefix) whose digit is >= b; the k-th lies in the largest b with ge[b] >= need
        ge = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist
        b = tl.max(tl.where(ge >= need, bins, -1), 0)
        need -= tl.sum(tl.where(bins > b, hist, 0), 0)
        prefix = (prefix << 8) | b.to(tl.uint32)
    # 2. keep the keys above the k-th and the first `need` equal to it, in id order, written at
    # their order of appearance; everything else is the tail, summed at its own maximum (log2 units)
    cnt = 0
    eq_seen = 0
    m_t = tl.full((), ninf, tl.float32)
    s_t = tl.zeros((), tl.float32)
    bad = 0
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0)
        a, key = _radix_key(x, scale, KEY_BITS)
        # a NaN or +inf logit makes the row NaN
        bad = tl.maximum(bad, tl.max(tl.where(mask & ((a != a) | (a == float("inf"))), 1, 0), 0))
        m_t, s_t = online_update(m_t, s_t, tl.where(mask & (key < prefix), a * LOG2E, ninf))
        cand = mask & (key >= prefix)
        if tl.sum(cand.to(tl.int32), 0) > 0:  # few blocks hold a kept entry
            eq = cand & (key == prefix)
            take = cand & ((key > prefix) | (eq_seen + tl.cumsum(eq.to(tl.int32), 0) <= need))
            pos = cnt + tl.cumsum(take.to(tl.int32), 0) - 1
            tl.store(idx_row + pos, offs.to(tl.int64), mask=take)
            tl.store(lp_row + pos, a, mask=take)
            cnt += tl.sum(take.to(tl.int32), 0)
            eq_seen += tl.sum(eq.to(tl.int32), 0)
            m_t, s_t = online_update(m_t, s_t, tl.where(cand & (take == 0), a * LOG2E, ninf))
    tl.debug_barrier()  # the kept entries, written by every thread, are read back by all
    # 3. rank the k kept entries (value descending, then id ascending) and store them in that order
    c = tl.arange(0, K_PAD)
    vals = tl.load(lp_row + c, mask=c < k, other=ninf)
    ids = tl.load(idx_row + c, mask=c < k, other=0)
    j = tl.arange(0, J)
    rank = tl.zeros((K_PAD,), tl.int32)
    for j0 in range(0, k, J):
        vj = tl.load(lp_row + j0 + j, mask=j0 + j < k, other=ninf)
        ij = tl.load(idx_row + j0 + j, mask=j0 + j < k, other=V)
        before = (vj[None, :] > vals[:, None]) | ((vj[None, :] == vals[:, None]) & (ij[None, :] < ids[:, None]))
        rank += tl.sum(before.to(tl.int32), 1)
    m = tl.max(vals, 0)
    safe = tl.where(m > ninf, m, 0.0)
    lse_in = safe + tl.log(tl.sum(tl.where(vals > ninf, tl.exp(vals - safe), 0.0), 0))
    lse_tail = log2_total(m_t, s_t) * LN2
    hi = tl.maximum(lse_in, lse_tail)
    lse_all = hi + tl.log(tl.exp(lse_in - hi) + tl.exp(lse_tail - hi))
    has = m > ninf
    rank = tl.where(bad > 0, c, rank)  # NaN values rank nowhere: keep the order of appearance
    tl.debug_barrier()  # every rank is computed before any entry moves
    tl.store(idx_row + rank, ids, mask=c < k)
    tl.store(lp_row + rank, tl.where(bad > 0, float("nan"), tl.where(has, vals - lse_all, ninf)), mask=c < k)
    tl.store(TAIL + row, tl.where(bad > 0, float("nan"), tl.where(has, lse_tail - lse_all, ninf)))


def topk_teacher(logits: torch.Tensor, k: int, temperature: float):
    """logits [N, V] -> (ids [N, k] largest first, logprobs [N, k] fp32, tail_logmass [N] fp32)."""
    _op_checks.topk(logits, k, temperature)
    n, vocab = logits.shape
    if k > MAX_K:
        raise ValueError(f"backend='triton' keeps at most k={MAX_K} entries per row, got k={k}; "
                         "use backend='torch' for more")
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    indices = torch.empty(n, k, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    tail = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        key_bits = 16 if logits.element_size() == 2 else 32
        k_pad = triton.next_power_of_2(k)  # J: kept entries ranked against the others at a time
        args = dict(X=x, IDX=indices, LP=logprobs, TAIL=tail, V=vocab, k=k, stride_x=x.stride(0),
                    scale=1.0 / temperature, KEY_BITS=key_bits, K_PAD=k_pad, J=max(1, 2048 // k_pad))
        _config.launch(_topk_teacher_kernel, (n,), args, _config.row_config("topk_teacher", vocab, logits.dtype))
    return indices, logprobs, tail
