"""Which backends exist, which are available here, and the one dispatch point that picks one.

    torch   pure PyTorch, everywhere: the reference and the fallback (fastkd/reference.py)
    cpu     C++ kernels in fastkd._C, CPU tensors (csrc/cpu/)
    triton  Triton kernels, CUDA tensors                 -- not in this version yet
    cuda    CUDA C++ kernels in fastkd._C, CUDA tensors  -- not in this version yet

`backend="auto"` picks the fastest available one for the tensors' device. Asking for a backend
that is not available raises; nothing silently falls back.
"""
import torch

from . import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")
# Fastest first, per device type.
_PREFERENCE = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


def _why_unavailable(name: str) -> str | None:
    """None when `name` is usable on this machine, else the reason it is not."""
    if name == "torch":
        return None
    if name == "cpu":
        if not _ext.loaded():
            return f"the compiled extension fastkd._C is not loaded ({_ext.LOAD_ERROR}); {_ext.BUILD_HINT}"
        return None
    if name in ("triton", "cuda"):
        return f"this version of fastkd has no {name} kernels yet (use backend='torch' on GPU tensors)"
    return f"unknown backend {name!r}; expected 'auto' or one of {BACKENDS}"


def available_backends() -> list[str]:
    """The backends usable on this machine, e.g. ["torch", "cpu"]."""
    return [b for b in BACKENDS if _why_unavailable(b) is None]


def resolve(backend: str, device: torch.device, implemented=BACKENDS, op: str = "this loss") -> str:
    """The backend to run `op` on tensors on `device`, among the backends that `implemented` it;
    raises ValueError for an unusable request."""
    if backend == "auto":
        for name in _PREFERENCE.get(device.type, ("torch",)):
            if name in implemented and _why_unavailable(name) is None:
                return name
        return "torch"
    why = _why_unavailable(backend)
    if why is not None:
        raise ValueError(f"backend={backend!r} is not available: {why}")
    if backend not in implemented:
        raise ValueError(f"backend={backend!r} has no kernel for {op} yet; use one of {list(implemented)}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors; the logits are on {device}")
    if backend in ("triton", "cuda") and device.type != "cuda":
        raise ValueError(f"backend={backend!r} runs on CUDA tensors; the logits are on {device}")
    return backend
