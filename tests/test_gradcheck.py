"""float64 gradcheck of every divergence on every CPU backend, with labels and hard-label mixing."""
import pytest
import torch

import fastkd
from conftest import CPU_BACKENDS, logits


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(backend, divergence, reduction):
    s = logits((2, 3, 7), torch.float64).requires_grad_(True)
    t = logits((2, 3, 7), torch.float64, seed=1)
    lab = torch.tensor([[1, -100, 6], [0, 3, -100]])

    def f(x):
        return fastkd.kd_loss(x, t, temperature=1.5, divergence=divergence, beta=0.3,
                              reduction=reduction, labels=lab, hard_weight=0.4, backend=backend)

    # The kept gradient is consumed by backward, so each evaluation recomputes the loss
    # (gradcheck calls f afresh for every perturbation and every backward).
    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_masked_vocabulary(backend):
    """-inf entries shared by student and teacher: gradient w.r.t. the finite entries."""
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, 2] = True
    mask[1, 5:] = True
    t = logits((3, 9), torch.float64, seed=1).masked_fill(mask, float("-inf"))
    s0 = logits((3, 9), torch.float64)

    def f(x):
        return fastkd.kd_loss(x.masked_fill(mask, float("-inf")), t, temperature=2.0,
                              divergence="jsd", backend=backend)

    assert torch.autograd.gradcheck(f, (s0.requires_grad_(True),), eps=1e-6, atol=1e-7)
