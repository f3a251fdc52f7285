import os

import pytest
import torch

if not torch.cuda.is_available():  # run the Triton kernels on CPU tensors, in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastkd  # noqa: E402

# Every backend that runs on CPU tensors here; the reference is "torch".
CPU_BACKENDS = [b for b in fastkd.available_backends() if b in ("torch", "cpu")]
COMPILED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def pytest_report_header(config):
    return f"fastkd backends: {fastkd.available_backends()}; torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def logits(shape, dtype=torch.float32, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def loss_and_grad(fn, student, *args, **kwargs):
    """(loss, d loss / d student) with `fn(student, *args, **kwargs)`, loss summed if not scalar."""
    x = student.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kwargs)
    (loss.sum() if loss.dim() else loss).backward()
    return loss.detach(), x.grad
