"""Backend "triton" of the op topk_teacher (fastkd/_schemas.py): one program per row.

Each entry becomes one int64 key: its scaled value's bits made order-preserving in the high
word, V - 1 - id in the low word, so keys are unique, order like the values and, on ties, put the
smaller id first. Pass 1 keeps the row's K_PAD largest keys (a power of two >= k): a block is
merged (tl.topk of the block, then of the two sorted lists) only when its largest key beats the
smallest kept one, so most blocks cost one compare. Pass 2 sums the tail -- the keys below the
k-th -- at its own maximum (never 1 - sum of the top k): log-probs a_i - log Z and the tail's
log-mass, with Z = the top's sum + the tail's.
"""
import torch
import triton
import triton.language as tl

from .. import _op_checks
from . import _config
from ._math import LN2, LOG2E, log2_total, online_update

MAX_K = 1024  # the kept list lives in registers


@triton.jit
def _to_key(a, offs, V):
    bits = a.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (V - 1 - offs).to(tl.int64)


@triton.jit
def _from_key(key, V):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), V - 1 - (key & 0xFFFFFFFF)


@triton.jit
def _topk_teacher_kernel(X, IDX, LP, TAIL, V, k, stride_x, scale, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    lowest = -9223372036854775807 - 1
    top = tl.full((K_PAD,), lowest, tl.int64)
    # 1. the K_PAD largest keys
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        a = tl.load(x_row + offs, mask=mask, other=ninf).to(tl.float32) * scale
        keys = tl.where(mask, _to_key(a, offs, V), lowest)
        if tl.max(keys, 0) > tl.min(top, 0):
            best = tl.topk(keys, K_PAD)
            top = tl.topk(tl.reshape(tl.join(top, best), (2 * K_PAD,)), K_PAD)
    c = tl.arange(0, K_PAD)
    kth = tl.min(tl.where(c < k, top, 9223372036854775807), 0)
    vals, ids = _from_key(top, V)
    m = tl.max(tl.where(c < k, vals, ninf), 0)
    # 2. the tail (keys below the k-th) at its own maximum, in log2 units
    m_t = tl.full((), ninf, tl.float32)
    s_t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        a = tl.load(x_row + offs, mask=mask, other=ninf).to(tl.float32) * scale
        keys = tl.where(mask, _to_key(a, offs, V), lowest)
        m_t, s_t = online_update(m_t, s_t, tl.where(keys < kth, a * LOG2E, ninf))
    lse_tail = log2_total(m_t, s_t) * LN2
    safe = tl.where(m > ninf, m, 0.0)
    s_in = tl.sum(tl.where((c < k) & (vals > ninf), tl.exp(vals - safe), 0.0), 0)
    lse_in = safe + tl.log(s_in)
    hi = tl.maximum(lse_in, lse_tail)
    lse_all = hi + tl.log(tl.exp(lse_in - hi) + tl.exp(lse_tail - hi))
    has = m > ninf
    # a NaN or +inf logit sorts first (or, a negative NaN, into the tail's sum): the row is NaN
    v0 = tl.sum(tl.where(c == 0, vals, 0.0), 0)
    bad = (v0 != v0) | (v0 == float("inf")) | (s_t != s_t)
    tl.store(IDX + row * k + c, ids, mask=c < k)
    tl.store(LP + row * k + c, tl.where(bad, float("nan"), tl.where(has, vals - lse_all, ninf)), mask=c < k)
    tl.store(TAIL + row, tl.where(bad, float("nan"), tl.where(has, lse_tail - lse_all, ninf)))


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
        k_pad = max(2, triton.next_power_of_2(k))  # tl.topk of one element fails in Triton 3.8's interpreter
        cfg = _config.row_config(vocab, logits.dtype, at_least=k_pad)
        _topk_teacher_kernel[(n,)](x, indices, logprobs, tail, vocab, k, x.stride(0), 1.0 / temperature,
                                   K_PAD=k_pad, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return indices, logprobs, tail
