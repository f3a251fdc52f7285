"""Dense KD fwd+bwd on the CPU: fastkd vs naive eager vs torch.compile(naive), side by side.

    make bench        # or: python -m pytest benchmarks -q

Peak memory growth of one fwd+bwd (the .grad included) goes into each row's extra_info, in
units of one N x V fp32 tensor. The issue's targets (N=1024, V=32000, fp32, T=2): fastkd >= 8x
eager and >= 2x compiled; peak growth at N=2048 <= 1.3x; bf16 at least as fast as fp32.
"""
import pytest
import torch

from fastkd.cli import bench
from conftest import make_inputs

SHAPES = [(1024, 32000), (2048, 32000), (256, 128256)]


@pytest.mark.parametrize("impl", ["fastkd", "eager", "compiled"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_fwd_bwd(benchmark, impls, impl, shape):
    n, v = shape
    s, t = make_inputs(n, v)
    fn = impls[impl]
    x = s.requires_grad_(True)
    benchmark.group = f"dense fwd+bwd {n}x{v} fp32"
    benchmark.extra_info["peak_x_NV_fp32"] = bench.peak_fwd_bwd(fn, s, t) / (n * v * 4)

    def step():
        x.grad = None
        fn(x, t).backward()

    fn(x, t).backward()  # warm-up (and compile)
    benchmark.pedantic(step, rounds=3, iterations=1)


@pytest.mark.parametrize("dtype, loss_scale", [(torch.float32, 1.0), (torch.bfloat16, 1.0), (torch.float16, 1.0),
                                               (torch.float16, 65536.0)],
                         ids=["fp32", "bf16", "fp16", "fp16-loss-scale-2^16"])
def test_dense_dtypes(benchmark, impls, dtype, loss_scale):
    """fp16 keeps its gradient in fp32 and casts in backward (docs/math.md, fp16 and loss scaling):
    this is what that costs against bf16, with and without GradScaler's factor."""
    s, t = make_inputs(1024, 32000, dtype)
    x = s.requires_grad_(True)
    benchmark.group = "dense fwd+bwd 1024x32000 fastkd by dtype"
    benchmark.extra_info["peak_x_NV_fp32"] = bench.peak_fwd_bwd(lambda a, b: impls["fastkd"](a, b) * loss_scale, s,
                                                                t) / (1024 * 32000 * 4)

    def step():
        x.grad = None
        (impls["fastkd"](x, t) * loss_scale).backward()

    step()
    benchmark.pedantic(step, rounds=5, iterations=1)
