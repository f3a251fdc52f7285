"""Launch shapes of the Triton kernels: block size and warps as a function of V and the dtype.

One program per row; a row is walked in blocks of BLOCK entries (a power of two). Bigger blocks
mean fewer loop trips and block reductions, smaller ones fewer registers per thread; 16-bit
inputs take twice the entries of fp32 for the same bytes. FASTKD_TRITON_AUTOTUNE=1 times the
candidates below on the first call of each (kernel, V, dtype) instead (triton.autotune).
"""
import os

import torch
import triton

MAX_BLOCK = {1: 8192, 2: 8192, 4: 4096, 8: 2048}  # by element size in bytes
AUTOTUNE = os.environ.get("FASTKD_TRITON_AUTOTUNE", "0") not in ("", "0")
CANDIDATES = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16)]


def row_config(vocab: int, dtype: torch.dtype, at_least: int = 1) -> dict:
    """{"BLOCK": entries per loop trip, "num_warps": warps per program} for rows of `vocab`."""
    cap = MAX_BLOCK[torch.empty((), dtype=dtype).element_size()]
    block = max(min(triton.next_power_of_2(max(vocab, 1)), cap), triton.next_power_of_2(at_least), 16)
    warps = 2 if block <= 512 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    return {"BLOCK": block, "num_warps": warps}


def autotuned(kernel, key=("V",)):
    """`kernel` wrapped in triton.autotune over CANDIDATES, keyed on `key` (for FASTKD_TRITON_AUTOTUNE=1)."""
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in CANDIDATES]
    return triton.autotune(configs=configs, key=list(key))(kernel)


def launch(kernel, tuned, grid, args: dict, vocab: int, dtype: torch.dtype, at_least: int = 1):
    """Launch `kernel` (or its autotuned twin `tuned` under FASTKD_TRITON_AUTOTUNE=1) over `grid`."""
    if AUTOTUNE and tuned is not None:
        tuned[grid](**args)
    else:
        cfg = row_config(vocab, dtype, at_least)
        kernel[grid](**args, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
