import os
import signal

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels on CPU tensors, in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastkd  # noqa: E402

# Every backend that runs on CPU tensors here; the reference is "torch".
CPU_BACKENDS = fastkd.backends.available_for("cpu", interpreted=False)
COMPILED_CPU_BACKENDS = [b for b in CPU_BACKENDS if fastkd.backends.RECORDS[b].compiled]


def pytest_report_header(config):
    return f"fastkd backends: {fastkd.available_backends()}; torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# FASTKD_TEST_TIMEOUT=S: a test running longer than S seconds fails with a TimeoutError instead of
# stalling the run (make gpu-report sets it; pytest-timeout is not everywhere). SIGALRM reaches
# Python between bytecodes, so a test stuck inside one native call is caught only by the caller's
# outer time limit.
_TEST_TIMEOUT = int(os.environ.get("FASTKD_TEST_TIMEOUT", "0") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TEST_TIMEOUT <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{item.nodeid} ran over FASTKD_TEST_TIMEOUT={_TEST_TIMEOUT} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(_TEST_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def device_of(backend: str) -> str:
    """Where a test runs `backend`: CUDA tensors for the GPU backends when a GPU is visible (then the
    interpreter, which runs Triton on CPU tensors, is off), else CPU tensors."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"


def on(device, *xs):
    """Each of xs (a tensor, a SparseTeacher or None) on `device`."""
    def move(x):
        if isinstance(x, fastkd.SparseTeacher):
            return fastkd.SparseTeacher(*(f.to(device) for f in x[:3]), x.temperature, x.kind)
        return None if x is None else x.to(device)
    return tuple(move(x) for x in xs)


def logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def loss_and_grad(fn, student, *args, **kwargs):
    """(loss, d loss / d student) with `fn(student, *args, **kwargs)`, loss summed if not scalar."""
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad
