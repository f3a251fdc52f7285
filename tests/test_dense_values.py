"""Values and gradients of kd_loss: the torch backend against the oracle, every compiled backend
against the torch backend, over every divergence x reduction x dtype."""
import pytest
import torch

import fastkd
from conftest import COMPILED_CPU_BACKENDS, logits, loss_and_grad
import oracle

DIVS = fastkd.DIVERGENCES
REDUCTIONS = ["mean", "sum", "none"]


def _labels(lead, vocab, ignore_every=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, vocab, lead, generator=g)
    lab.view(-1)[::ignore_every] = -100
    return lab


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_backend_matches_oracle(divergence, reduction):
    s, t = logits((2, 3, 50), torch.float64), logits((2, 3, 50), torch.float64, seed=1)
    lab = _labels((2, 3), 50)
    opts = dict(temperature=1.7, divergence=divergence, beta=0.3, reduction=reduction,
                labels=lab, hard_weight=0.25)
    want, want_g = loss_and_grad(oracle.kd_loss, s, t, **opts)
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, backend="torch", **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", COMPILED_CPU_BACKENDS)
@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_backend_matches_reference(backend, divergence, reduction, dtype):
    vocab = 333  # not a multiple of any vector width: exercises the padded tail
    s, t = logits((4, 5, vocab), dtype), logits((4, 5, vocab), dtype, seed=1)
    opts = dict(temperature=2.0, divergence=divergence, beta=0.4, reduction=reduction,
                labels=_labels((4, 5), vocab), hard_weight=0.2)
    want, want_g = loss_and_grad(fastkd.kd_loss, s, t, backend="torch", **opts)
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, backend=backend, **opts)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got_g.dtype == dtype and got_g.shape == s.shape
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 1e-5)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # Gradients are rounded to the student's dtype by both backends: allow one ulp of it.
    gtol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got_g.double(), want_g.double(), rtol=gtol, atol=gtol * want_g.abs().max().item())


@pytest.mark.parametrize("backend", ["torch"] + COMPILED_CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp64_truth(backend, dtype):
    """bf16/fp16 inputs accumulate in fp32: the loss matches fp64 math on the same rounded inputs."""
    s, t = logits((64, 1000), dtype), logits((64, 1000), dtype, seed=1)
    want, want_g = loss_and_grad(oracle.kd_loss, s.double(), t.double(), temperature=2.0)
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, temperature=2.0, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g.double(), want_g, rtol=1e-2, atol=1e-2 * want_g.abs().max().item())


@pytest.mark.parametrize("backend", ["torch"] + COMPILED_CPU_BACKENDS)
@pytest.mark.parametrize("scale_by_t2", [True, False])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_temperature_and_t2_scaling(backend, scale_by_t2, temperature):
    s, t = logits((6, 40), torch.float64), logits((6, 40), torch.float64, seed=1)
    opts = dict(temperature=temperature, scale_by_t2=scale_by_t2, divergence="jsd")
    want, want_g = loss_and_grad(oracle.kd_loss, s, t, **opts)
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, backend=backend, **opts)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_g, want_g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch"] + COMPILED_CPU_BACKENDS)
def test_pure_hard_label_is_cross_entropy(backend):
    s, t = logits((8, 30), torch.float64), logits((8, 30), torch.float64, seed=1)
    lab = torch.randint(0, 30, (8,))
    got = fastkd.kd_loss(s, t, labels=lab, hard_weight=1.0, temperature=3.0, backend=backend)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(s, lab))


@pytest.mark.parametrize("backend", ["torch"] + COMPILED_CPU_BACKENDS)
def test_identical_distributions_give_zero(backend):
    s = logits((5, 70))
    for div in DIVS:
        loss, grad = loss_and_grad(fastkd.kd_loss, s, s.clone(), divergence=div, backend=backend)
        assert abs(loss.item()) < 1e-6, div
        assert grad.abs().max().item() < 1e-6, div


@pytest.mark.parametrize("backend", ["torch"] + COMPILED_CPU_BACKENDS)
def test_large_batch_spans_chunks_and_threads(backend):
    """More rows than one chunk of the torch backend / one thread's share."""
    s, t = logits((300, 4099)), logits((300, 4099), seed=1)
    want, want_g = loss_and_grad(oracle.kd_loss, s.double(), t.double(), temperature=2.0, reduction="sum")
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, temperature=2.0, reduction="sum", backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_g.double(), want_g, rtol=1e-4, atol=1e-7)
