"""Loading the compiled extension fastkd._C, and what to say when it is missing.

A missing or broken extension is reported once, with how to build it; it is never swallowed:
asking for a compiled backend then raises with the original import error.
"""
import json
import warnings

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make build`) in the fastkd checkout"
)

try:
    from . import _C  # noqa: F401  (registers the TORCH_LIBRARY_IMPL kernels on import)

    LOAD_ERROR = None
except ImportError as e:  # pragma: no cover - exercised only on a machine without the build
    _C = None
    LOAD_ERROR = e
    warnings.warn(
        f"fastkd: the compiled extension fastkd._C could not be loaded ({e}); only the 'torch' "
        f"backend is available. To get the fast kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _C is not None


def cuda_built() -> bool:
    """Whether fastkd._C holds the CUDA kernels (built with FASTKD_CUDA=1)."""
    return _C is not None and bool(json.loads(_C.build_info()).get("cuda"))


def build_info() -> dict:
    """What fastkd._C was built with (torch version, CUDA, compiler flags), or why it is missing."""
    if _C is None:
        return {"loaded": False, "error": str(LOAD_ERROR), "hint": BUILD_HINT}
    info = json.loads(_C.build_info())
    info["loaded"] = True
    info["cpu_isa"] = _C.cpu_capability()
    return info
