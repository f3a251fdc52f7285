"""Property-based tests (hypothesis) over shapes, dtypes, temperatures, masks and options:
every compiled backend agrees with the torch reference, and invariants hold."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkd
from conftest import COMPILED_CPU_BACKENDS, loss_and_grad

pytestmark = pytest.mark.skipif(not COMPILED_CPU_BACKENDS, reason="fastkd._C not built")

SETTINGS = settings(max_examples=int(__import__('os').environ.get('FASTKD_HYPOTHESIS_EXAMPLES', 60)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    vocab = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    s = (torch.randn(lead + (vocab,), generator=g, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(lead + (vocab,), generator=g, dtype=torch.float64) * scale).to(dtype)
    if draw(st.booleans()) and vocab > 1:  # a shared masked vocabulary slice
        lo = draw(st.integers(0, vocab - 1))
        hi = draw(st.integers(lo + 1, vocab))
        if hi - lo < vocab:
            s[..., lo:hi] = float("-inf")
            t[..., lo:hi] = float("-inf")
    labels = None
    hard_weight = 0.0
    if draw(st.booleans()):
        labels = torch.randint(0, vocab, lead, generator=g)
        labels[torch.rand(lead, generator=g) < 0.3] = -100
        hard_weight = draw(st.sampled_from([0.0, 0.3, 1.0]))
        if hard_weight > 0 and s.isinf().any():  # CE at a masked label is +inf by definition
            labels = torch.where(s.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1).isinf(), -100, labels)
    opts = dict(
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 7.5])),
        divergence=draw(st.sampled_from(fastkd.DIVERGENCES)),
        beta=draw(st.sampled_from([0.1, 0.5, 0.9])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        scale_by_t2=draw(st.booleans()),
        labels=labels,
        hard_weight=hard_weight,
    )
    return s, t, opts


def rounding_scale(s, t, opts):
    """fp32 log-probabilities carry an absolute rounding error of a few eps * (|logits / T| + log V)
    per entry, in every backend, though not identically; the divergences, and gradient entries
    like q (log q - log p - D), are differences of such values. Returns (eps * that spread,
    the loss weight, the gradient weight) for the tolerances below."""
    finite = torch.cat([s.double()[s.isfinite()], t.double()[t.isfinite()]])
    temp = opts["temperature"]
    spread = 1 + math.log(s.shape[-1]) + (finite.abs().max().item() / temp if finite.numel() else 0)
    eps = torch.finfo(torch.float64 if s.dtype == torch.float64 else torch.float32).eps
    loss_weight = (temp * temp if opts["scale_by_t2"] else 1.0) + opts["hard_weight"]
    grad_weight = (temp if opts["scale_by_t2"] else 1 / temp) + opts["hard_weight"]
    return eps * spread, loss_weight, grad_weight


@SETTINGS
@given(cases(), st.sampled_from(COMPILED_CPU_BACKENDS or ["torch"]))
def test_backend_agrees_with_reference(case, backend):
    s, t, opts = case
    want, want_g = loss_and_grad(fastkd.kd_loss, s, t, backend="torch", **opts)
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, backend=backend, **opts)
    assert torch.isfinite(got).all() and torch.isfinite(got_g.float()).all()
    assert got.shape == want.shape and got_g.dtype == s.dtype
    err, loss_weight, grad_weight = rounding_scale(s, t, opts)
    rows = s[..., 0].numel() if opts["reduction"] == "sum" else 1
    tol = 1e-10 if s.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol + 8 * err * loss_weight * rows)
    gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[s.dtype]
    torch.testing.assert_close(got_g.double(), want_g.double(), rtol=gtol,
                               atol=gtol * want_g.abs().max().item() + 4 * err * grad_weight)


@SETTINGS
@given(cases())
def test_invariants(case):
    """Divergences are >= 0; gradient rows of pure KD sum to 0; ignored rows are exactly 0."""
    s, t, opts = case
    opts = dict(opts, reduction="none")
    loss, grad = loss_and_grad(fastkd.kd_loss, s, t, **opts)
    if opts["hard_weight"] == 0:
        assert (loss >= -1e-5).all()
        # Each entry is rounded to the student's dtype (eps * sum |g|) after fp32 math whose
        # error is rounding_scale's.
        err, _, grad_weight = rounding_scale(s, t, opts)
        row_sums = grad.double().sum(-1)
        bound = torch.finfo(s.dtype).eps * grad.double().abs().sum(-1).max() + 4 * err * grad_weight * s.shape[-1]
        assert row_sums.abs().max() <= bound
    if opts["labels"] is not None:
        ignored = opts["labels"] == -100
        assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
