"""GPU-only checks (skipped cleanly without CUDA): large vocabularies that take many blocks per
row, no host synchronisation in any loss path, and launches on the current stream. The ops
themselves run on CUDA tensors in test_dispatch.py on such a machine."""
import pytest
import torch

import fastkd
from conftest import loss_and_grad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BACKENDS = [b for b in fastkd.backends.available_for("cuda") if b != "torch"]


def _pair(n, vocab, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(n, vocab, device="cuda", generator=g) * 3).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_large_vocab_matches_reference(backend, dtype, vocab, divergence):
    s, t = _pair(48, vocab, dtype)
    labels = torch.randint(0, vocab, (48,), device="cuda")
    labels[::5] = -100
    opts = dict(temperature=2.0, divergence=divergence, labels=labels, hard_weight=0.1)
    want, want_g = loss_and_grad(fastkd.kd_loss, s, t, backend="torch", **opts)
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, backend=backend, **opts)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got_g.double(), want_g.double(), rtol=tol, atol=tol * want_g.abs().max().item())
    teacher = fastkd.topk_teacher(t, k=64, temperature=2.0, backend="torch")
    got_t = fastkd.topk_teacher(t, k=64, temperature=2.0, backend=backend)
    torch.testing.assert_close(got_t.logprobs, teacher.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_t.tail_logmass, teacher.tail_logmass, rtol=0, atol=1e-4)
    for tail in ("bucket", "renorm_teacher", "renorm_both"):
        want, want_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, tail=tail, backend="torch")
        got, got_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, tail=tail, backend=backend)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(got_g.double(), want_g.double(), rtol=tol, atol=tol * want_g.abs().max().item())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend):
    """docs/design.md 3: no .item() or data-dependent Python branch in any loss path on CUDA."""
    s, t = _pair(64, 5000, torch.bfloat16)
    labels = torch.randint(0, 5000, (64,), device="cuda")
    teacher = fastkd.topk_teacher(t, k=16, temperature=2.0, backend=backend)
    x = s.detach().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastkd.kd_loss(x, t, temperature=2.0, labels=labels, hard_weight=0.2, backend=backend).backward()
        fastkd.sparse_kd_loss(x, teacher, labels=labels, backend=backend).backward()
        fastkd.sample_teacher(t, 8, 2.0, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_runs_on_the_current_stream(backend):
    s, t = _pair(32, 3000, torch.float32)
    want = fastkd.kd_loss(s, t, backend="torch", reduction="none")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fastkd.kd_loss(s, t, backend=backend, reduction="none")
    side.synchronize()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="fastkd._C built without the CUDA kernels")
@pytest.mark.parametrize("cluster", ["1", "2", "4", "8"])
@pytest.mark.parametrize("vocab, dtype", [(128256, torch.bfloat16), (32001, torch.float32), (20000, torch.float64)])
def test_cuda_row_splits_agree(monkeypatch, cluster, vocab, dtype):
    """Every way kernels/plan.h can split a row -- one block or a cluster of 2-8 (sm_90+), cached in
    shared memory or re-read (fp64, too big to cache), 16-byte vectors or single columns (an odd
    V) -- gives the reference's loss and gradient, dense and sparse."""
    monkeypatch.setenv("FASTKD_CUDA_CLUSTER", cluster)
    s, t = _pair(24, vocab, dtype, seed=int(cluster))
    labels = torch.randint(0, vocab, (24,), device="cuda")
    labels[::4] = -100
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        opts = dict(temperature=1.5, divergence=divergence, labels=labels, hard_weight=0.2)
        want, want_g = loss_and_grad(fastkd.kd_loss, s, t, backend="torch", **opts)
        got, got_g = loss_and_grad(fastkd.kd_loss, s, t, backend="cuda", **opts)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(got_g.double(), want_g.double(), rtol=tol, atol=tol * want_g.abs().max().item())
    teacher = fastkd.topk_teacher(t, k=50, temperature=1.5, backend="torch")
    want, want_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, labels=labels, hard_weight=0.2, backend="torch")
    got, got_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, labels=labels, hard_weight=0.2, backend="cuda")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(got_g.double(), want_g.double(), rtol=tol, atol=tol * want_g.abs().max().item())
