import pytest
import torch

from fastkd.cli import bench


@pytest.fixture(scope="session")
def impls():
    """fastkd, naive eager and torch.compile(naive) -- compiled once per session."""
    return bench.implementations(temperature=2.0)


def make_inputs(n, v, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(n, v, generator=g) * 2).to(dtype)
    t = (torch.randn(n, v, generator=g) * 2).to(dtype)
    return s, t
