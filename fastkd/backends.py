"""The one dispatch table: which backend implements which op, and the one place that turns
(op, backend, device) into the callable.

    torch   pure PyTorch, everywhere: the reference and the fallback       fastkd/reference/<op>.py
    cpu     C++ kernels in fastkd._C, CPU tensors                          csrc/cpu/<op>.cpp
    triton  Triton kernels, CUDA tensors (CPU tensors only under
            TRITON_INTERPRET=1, and only when named)                       fastkd/triton/<op>.py
    cuda    CUDA C++ kernels in fastkd._C, CUDA tensors                    kernels/<op>.cu

An op has one schema (fastkd/_ops.py) and one implementation per backend. The compiled
backends register theirs under the op's own name with TORCH_LIBRARY_IMPL (dispatch keys CPU and
CUDA); a Python backend `b` defines the function `<op>` in `fastkd/<package of b>/<op>.py` (torch:
reference/, triton: triton/), registered here as the op `<op>_<b>`. `backend="auto"` picks the
fastest available backend for the tensors' device; asking for one that is unavailable, or that has
no kernel for the op, raises: nothing silently falls back. Adding a backend is one directory and
its entries in OPS.
"""
import importlib
import importlib.util
import os

from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class Backend:
    """One backend: the device types whose tensors its kernels take ("cpu" for triton only in its
    interpreter, TRITON_INTERPRET=1), whether its kernels are compiled into fastkd._C (registered
    under the op's own name) or are Python functions in fastkd/<package>/<op>.py (registered as
    <op>_<name> for the dispatch keys `keys`)."""

    name: str
    devices: tuple
    compiled: bool
    package: str | None = None
    keys: tuple = ()
    interpreted_on: tuple = ()  # device types it runs on only through an interpreter


RECORDS = {
    "torch": Backend("torch", ("cpu", "cuda"), False, "reference", ("CompositeExplicitAutograd",)),
    "cpu": Backend("cpu", ("cpu",), True),
    "triton": Backend("triton", ("cuda", "cpu"), False, "triton", ("CUDA", "CPU"), interpreted_on=("cpu",)),
    "cuda": Backend("cuda", ("cuda",), True),
}
BACKENDS = tuple(RECORDS)
COMPILED = tuple(b.name for b in RECORDS.values() if b.compiled)

# op -> the backends that implement it.
OPS = {
    "dense_kd": ("torch", "cpu", "triton", "cuda"),
    "sparse_kd": ("torch", "cpu", "triton", "cuda"),
    "topk_teacher": ("torch", "cpu", "triton", "cuda"),
    "sample_teacher_draws": ("torch", "cpu", "triton", "cuda"),
    "dense_kd_stats": ("torch", "cpu", "triton"),
    "dense_kd_shard": ("torch", "cpu", "triton"),
    "dense_kd_finish": ("torch", "cpu", "triton"),
    "sparse_kd_stats": ("torch", "cpu", "triton"),
    "sparse_kd_shard": ("torch", "cpu", "triton"),
    "unpack_bits": ("torch", "cpu"),
    "unpack_monotone": ("torch", "cpu"),
}

# What `auto` tries, fastest first, per device type. `cuda` leads only once its kernels have
# passed the GPU suite on real hardware (benchmarks/results/); until then Triton is the GPU path.
AUTO = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
AUTO_WHY = {"cuda": "the Triton kernels are the GPU path until the CUDA C++ backend (kernels/, "
                    "compiled and linked but never yet run on a GPU) has passed the GPU suite on real "
                    "hardware; name backend='cuda' to use it"}

# A Python backend's package (fastkd/<package>/<op>.py) and the dispatch keys its functions serve.
_PYTHON = {b.name: (b.package, b.keys) for b in RECORDS.values() if not b.compiled}


def qualname(op: str, backend: str) -> str:
    """The torch.ops.fastkd name of `op` on `backend`: `op` for the compiled ones, else `op_backend`."""
    return op if backend in COMPILED else f"{op}_{backend}"


def interpreting() -> bool:
    """Whether Triton runs its kernels in its interpreter (on CPU tensors): TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_unavailable(name: str) -> str | None:
    """None when `name` is usable on this machine, else the reason it is not."""
    from . import _ext  # (not at import: fastkd/_ops.py declares the ops before _C registers kernels)

    if name == "torch":
        return None
    if name == "cpu":
        if not _ext.loaded():
            return f"needs the compiled extension fastkd._C, which is not loaded ({_ext.LOAD_ERROR}); {_ext.BUILD_HINT}"
        return None
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "is not installed: pip install triton (or pip install 'fastkd[triton]')"
        if not (torch.cuda.is_available() or interpreting()):
            return ("needs a CUDA device (or TRITON_INTERPRET=1, which runs its kernels on CPU "
                    "tensors in Triton's interpreter)")
        if interpreting():
            return _interpreter_problem()
        return None
    if name == "cuda":
        if not _ext.cuda_built():
            return ("is not in this build of fastkd._C (build it with FASTKD_CUDA=1 on a machine "
                    "with nvcc)")
        if not torch.cuda.is_available():
            return "needs a CUDA device (this build of fastkd._C has the CUDA kernels)"
        return None
    return f"is unknown; expected 'auto' or one of {BACKENDS}"


def _version(package: str) -> tuple:
    import importlib.metadata

    try:
        return tuple(int(x) for x in importlib.metadata.version(package).split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ()


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run here, or None: Triton 3.6's fails every kernel with
    NumPy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars")."""
    if () < _version("triton") < (3, 7) and _version("numpy") >= (2, 4):
        return ("runs in Triton's interpreter (TRITON_INTERPRET=1), whose Triton "
                f"{'.'.join(map(str, _version('triton')))} fails with NumPy >= 2.4: pip install 'numpy<2.4'")
    return None


def available_backends() -> list[str]:
    """The backends usable on this machine, e.g. ["torch", "cpu"]."""
    return [b for b in BACKENDS if _why_unavailable(b) is None]


def available_for(device_type: str, interpreted: bool = True) -> list:
    """The backends available here whose kernels take tensors of `device_type` ("cpu", "cuda"), in
    BACKENDS order; interpreted=False leaves out those that would run in an interpreter (triton on
    CPU tensors). What the tests walk, instead of lists of their own."""
    return [b for b in available_backends() if device_type in RECORDS[b].devices
            and (interpreted or device_type not in RECORDS[b].interpreted_on)]


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs `op` on tensors on `device`; ValueError for an unusable request."""
    implemented = OPS[op]
    if backend == "auto":
        for name in AUTO.get(device.type, ("torch",)):
            if name in implemented and _why_unavailable(name) is None:
                return name
        return "torch"
    why = _why_unavailable(backend)
    if why is not None:
        raise ValueError(f"backend={backend!r} is not available: {backend} {why}")
    if backend not in implemented:
        raise ValueError(f"backend={backend!r} has no kernel for {op} yet; use one of {list(implemented)}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors; the tensors are on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors; the tensors are on {device}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"backend='triton' runs on CUDA tensors (CPU tensors only under "
                         f"TRITON_INTERPRET=1); the tensors are on {device}")
    return backend


def auto_choice(device_type: str) -> tuple[str, str]:
    """(the backend `auto` picks for the losses on `device_type` tensors, why) -- for `info`."""
    skipped = []
    for name in AUTO.get(device_type, ("torch",)):
        why = _why_unavailable(name)
        if why is None:
            return name, "; ".join(skipped) or AUTO_WHY.get(device_type, "the fastest available here")
        skipped.append(f"{name} {why}")
    return "torch", "; ".join(skipped)


_registered: set[tuple[str, str]] = set()


def register(op: str, backend: str) -> None:
    """Register Python backend `backend`'s function for `op` as the op `<op>_<backend>` (once;
    imports fastkd/<package>/<op>.py on first use, so triton is imported only when used)."""
    if (op, backend) in _registered or backend in COMPILED:
        return
    package, keys = _PYTHON[backend]
    fn = getattr(importlib.import_module(f"fastkd.{package}.{op}"), op)
    for key in keys:
        torch.library.impl(f"fastkd::{qualname(op, backend)}", key)(fn)
    _registered.add((op, backend))


def kernel(op: str, backend: str, device: torch.device):
    """The callable (a torch.ops.fastkd op) that runs `op` on `device` with `backend` ("auto" too)."""
    name = resolve(op, backend, device)
    register(op, name)
    return getattr(torch.ops.fastkd, qualname(op, name))
