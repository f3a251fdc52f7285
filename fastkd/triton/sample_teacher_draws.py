"""Backend "triton" of the op sample_teacher_draws (fastkd/_ops.py): one program per row.

Inverse CDF, as on every backend: pass 1 finds the row's maximum m, pass 2 sums e = exp(a - m)
(Z, in fp64), pass 3 walks the running fp64 sum block by block and gives each of the row's
ascending uniforms u the first id whose running sum exceeds u Z (u Z beyond the total, lost to
rounding, takes the last id with e > 0) -- a binary search within the block that holds it, so the
work and the registers do not grow with the number of draws. A row with no finite logit draws -1.
"""
import math

import torch
import triton
import triton.language as tl

from .. import _op_checks
from . import _config


@triton.jit
def _sample_teacher_kernel(X, U, OUT, V, S, stride_x, scale2, S_PAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BLOCK)
    ninf = float("-inf")
    c = tl.arange(0, S_PAD)
    m = tl.full((), ninf, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        a2 = tl.load(x_row + offs, mask=offs < V, other=ninf).to(tl.float32) * scale2
        m = tl.maximum(m, tl.max(a2, 0))
    draws = tl.full((S_PAD,), -1, tl.int64)
    if m > ninf:
        z = tl.zeros((), tl.float64)
        for start in range(0, V, BLOCK):
            offs = start + cols
            a2 = tl.load(x_row + offs, mask=offs < V, other=ninf).to(tl.float32) * scale2
            z += tl.sum(tl.exp2(a2 - m).to(tl.float64), 0)
        target = tl.load(U + row * S + c, mask=c < S, other=2.0) * z
        draws = tl.full((S_PAD,), -2, tl.int64)  # -2: not placed yet
        run = tl.zeros((), tl.float64)
        last = tl.full((), -1, tl.int64)
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            a2 = tl.load(x_row + offs, mask=mask, other=ninf).to(tl.float32) * scale2
            e = tl.exp2(a2 - m).to(tl.float64)
            cum = run + tl.cumsum(e, 0)  # non-decreasing; flat past V (e = 0 there)
            end = run + tl.sum(e, 0)
            here = (draws == -2) & (target < end)  # the draws this block places
            if tl.sum(here.to(tl.int32), 0) > 0:
                # each target's id: #{j : cum_j <= target}, by a binary search over the block
                pos = tl.zeros((S_PAD,), tl.int32)
                for i in tl.static_range(13):  # the bits of a position, BLOCK <= 8192
                    bit = 4096 >> i
                    if bit < BLOCK:
                        probe = tl.gather(cum, pos + (bit - 1), 0)
                        pos = tl.where(probe <= target, pos + bit, pos)
                draws = tl.where(here, start + pos, draws)
            last = tl.maximum(last, tl.max(tl.where(e > 0, offs, -1), 0).to(tl.int64))
            run = end
        draws = tl.where(draws == -2, last, draws)
    tl.store(OUT + row * S + c, draws, mask=c < S)


def sample_teacher_draws(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits [N, V], uniforms [N, S] fp64 ascending in [0, 1) -> draws [N, S] int64 ascending."""
    _op_checks.draws(logits, uniforms, temperature)
    n, vocab = logits.shape
    s = uniforms.shape[1]
    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    draws = torch.empty(n, s, dtype=torch.long, device=logits.device)
    if n and s:
        if vocab == 0:
            return draws.fill_(-1)
        args = dict(X=x, U=uniforms.contiguous(), OUT=draws, V=vocab, S=s, stride_x=x.stride(0),
                    scale2=math.log2(math.e) / temperature, S_PAD=triton.next_power_of_2(s))
        _config.launch(_sample_teacher_kernel, (n,), args, _config.row_config("sample_teacher_draws", vocab,
                                                                              logits.dtype))
    return draws
