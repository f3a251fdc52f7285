"""Launch shapes of the Triton kernels, and the one place a kernel is launched.

One program per row; a row is walked in blocks of BLOCK entries (a power of two). Bigger blocks
mean fewer loop trips and more loads in flight, smaller ones fewer registers per thread. The
largest block of each kernel is the largest at which the compiled program stays within the
budgets `make triton-check` enforces (no spill in a 16/32-bit configuration, at most 128
registers a thread at 8 warps: two programs per SM), read from its table in docs/backends.md.
FASTKD_TRITON_AUTOTUNE=1 times the candidates within the same limits on the first call of each
(kernel, V, dtype) instead (triton.autotune) -- for the unsharded kernels; the vocab-parallel
partial forms always run at their largest block.

Every launcher starts its kernel through launch(), so `recording()` can collect what the
launchers choose -- the kernel, its arguments and warps -- without running anything: that is
how tools/triton_check.py derives the configurations it compiles ahead of time.
"""
import contextlib
import os

import torch
import triton

# The largest BLOCK by kernel (the row-loss kernels by code path) and element size in bytes.
MAX_BLOCK = {
    "dense_kd": {2: 4096, 4: 2048, 8: 1024},
    "dense_kd_mixed": {2: 2048, 4: 2048, 8: 512},  # the divergences through a mixture: jsd, skew_*
    "sparse_kd": {2: 4096, 4: 2048, 8: 1024},
    # the vocab-parallel partial forms (fastkd.distributed)
    "dense_kd_stats": {2: 4096, 4: 2048, 8: 1024},
    "dense_kd_shard": {2: 4096, 4: 2048, 8: 1024},
    "dense_kd_shard_mixed": {2: 2048, 4: 2048, 8: 512},
    "dense_kd_finish": {2: 4096, 4: 4096, 8: 2048},
    "sparse_kd_stats": {2: 4096, 4: 2048, 8: 1024},
    "sparse_kd_shard": {2: 4096, 4: 2048, 8: 1024},
    "topk_teacher": {2: 2048, 4: 2048, 8: 1024},
    "sample_teacher_draws": {2: 2048, 4: 2048, 8: 1024},
}
AUTOTUNE = os.environ.get("FASTKD_TRITON_AUTOTUNE", "0") not in ("", "0")
CANDIDATES = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 16)]  # (BLOCK, num_warps)


def warps_for(block: int) -> int:
    """Warps of a program walking BLOCK entries a trip: 2 up to 256, 4 up to 1024, then 8."""
    return 2 if block <= 256 else 4 if block <= 1024 else 8


def maxnreg_for(warps: int) -> int:
    """The register cap (ptx .maxnreg) that keeps two programs of `warps` warps on an SM (65536
    registers): 128 at 8 warps, the hardware's 255 at 4 or fewer. Without a cap ptxas may trade
    registers for occupancy and spill (ptxas 13 gave one 8-warp program 64 registers and 8
    spilled bytes, one 4-warp fp64 program 128 and 4)."""
    return min(255, 65536 // (2 * 32 * warps))


def row_config(kind: str, vocab: int, dtype: torch.dtype, at_least: int = 1) -> dict:
    """{"BLOCK": entries per loop trip, "num_warps": warps per program, "maxnreg": register cap}
    of kernel `kind` (a key of MAX_BLOCK) on rows of `vocab` entries of `dtype`."""
    cap = MAX_BLOCK[kind][max(torch.empty((), dtype=dtype).element_size(), 2)]
    block = max(min(triton.next_power_of_2(max(vocab, 1)), cap), triton.next_power_of_2(at_least), 16)
    warps = warps_for(block)
    return {"BLOCK": block, "num_warps": warps, "maxnreg": maxnreg_for(warps)}


def candidates(kind: str, dtype: torch.dtype) -> list:
    """The autotune candidates of kernel `kind` for `dtype`: CANDIDATES up to its largest block (or
    that block alone when every candidate is larger)."""
    cap = MAX_BLOCK[kind][max(torch.empty((), dtype=dtype).element_size(), 2)]
    return [(b, w) for b, w in CANDIDATES if b <= cap] or [(cap, warps_for(cap))]


def autotuned(kernel, kind_of, key=("V",)):
    """`kernel` wrapped in triton.autotune over CANDIDATES (for FASTKD_TRITON_AUTOTUNE=1), pruned per
    call to candidates(kind_of(named_args), dtype of the student S)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        allowed = candidates(kind_of(args), args["S"].dtype)
        return [c for c in configs if (c.kwargs["BLOCK"], c.num_warps) in allowed]

    configs = [triton.Config({"BLOCK": b}, num_warps=w, maxnreg=maxnreg_for(w)) for b, w in CANDIDATES]
    return triton.autotune(configs=configs, key=list(key), prune_configs_by={"early_config_prune": prune})(kernel)


_recorder = None


@contextlib.contextmanager
def recording():
    """Within it, launch() starts nothing and appends (kernel, args, options) to the list it yields
    -- options the compile options num_warps and maxnreg -- one entry per configuration the launch
    could compile (every candidate under autotune)."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


def _options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "maxnreg") if cfg.get(k) is not None}


def launch(kernel, grid, args: dict, cfg: dict, tuned=None, kind: str = ""):
    """Start `kernel` over `grid` with `args` and cfg's BLOCK, num_warps and maxnreg -- or, under
    FASTKD_TRITON_AUTOTUNE=1, its autotuned twin `tuned` (which picks them itself)."""
    tuning = AUTOTUNE and tuned is not None
    if _recorder is not None:
        shapes = candidates(kind, args["S"].dtype) if tuning else [(cfg["BLOCK"], cfg["num_warps"])]
        _recorder.extend((kernel, {**args, "BLOCK": b}, _options({"num_warps": w, "maxnreg": maxnreg_for(w)}))
                         for b, w in shapes)
    elif tuning:
        tuned[grid](**args)
    else:
        kernel[grid](**args, BLOCK=cfg["BLOCK"], **_options(cfg))
