"""Property-based tests (hypothesis) over shapes, dtypes, temperatures, masks and options:
every compiled backend agrees with the torch reference, and invariants hold."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkd
from conftest import COMPILED_CPU_BACKENDS, loss_and_grad

pytestmark = pytest.mark.skipif(not COMPILED_CPU_BACKENDS, reason="fastkd._C not built")

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


@SETTINGS
@given(cases(), st.sampled_from(COMPILED_CPU_BACKENDS or ["torch"]))
def test_backend_agrees_with_reference(case, backend):
    s, t, opts = case
    want, want_g = loss_and_grad(fastkd.kd_loss, s, t, backend="torch", **opts)
    got, got_g = loss_and_grad(fastkd.kd_loss, s, t, backend=backend, **opts)
    assert torch.isfinite(got).all() and torch.isfinite(got_g.float()).all()
    assert got.shape == want.shape and got_g.dtype == s.dtype
    tol = 1e-10 if s.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * (1 + want.abs().max().item()))
    # Gradient entries like q (log q - log p - D) cancel: their rounding error grows with the
    # size of the scaled logits |s/T|, which both backends round alike but not identically.
    finite = s.double()[s.isfinite()]
    spread = 1 + (finite.abs().max().item() / opts["temperature"] if finite.numel() else 0)
    gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[s.dtype]
    eps = torch.finfo(torch.float64 if s.dtype == torch.float64 else torch.float32).eps
    torch.testing.assert_close(got_g.double(), want_g.double(), rtol=gtol,
                               atol=(gtol + 16 * eps * spread) * (1e-6 + want_g.abs().max().item()))


@SETTINGS
@given(cases())
def test_invariants(case):
    """Divergences are >= 0; gradient rows of pure KD sum to 0; ignored rows are exactly 0."""
    s, t, opts = case
    opts = dict(opts, reduction="none")
    loss, grad = loss_and_grad(fastkd.kd_loss, s, t, **opts)
    if opts["hard_weight"] == 0:
        assert (loss >= -1e-5).all()
        row_sums = grad.double().sum(-1)
        assert row_sums.abs().max() <= 1e-3 * (1 + grad.double().abs().sum(-1).max())
    if opts["labels"] is not None:
        ignored = opts["labels"] == -100
        assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
