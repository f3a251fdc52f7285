"""Sparse teachers: topk_teacher / sample_teacher, and sparse_kd_loss for every tail mode."""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from conftest import CPU_BACKENDS, logits, loss_and_grad

TAILS = ["bucket", "renorm_teacher", "renorm_both"]


def oracle_sparse(s, teacher, tail, reduction="mean", labels=None, hard_weight=0.0, ignore_index=-100):
    """docs/design.md section 2's sparse table, written plainly and differentiated by autograd (fp64)."""
    T = teacher.temperature
    v = s.shape[-1]
    s2 = s.reshape(-1, v)
    idx = teacher.indices.reshape(s2.shape[0], -1)
    lp = teacher.logprobs.reshape(idx.shape).double()
    known = lp > float("-inf")
    lq = F.log_softmax(s2 / T, -1)
    p = lp.exp() * known
    lq_i = lq.gather(-1, idx)
    rows = []
    for r in range(s2.shape[0]):
        k = known[r]
        pi, lpi, lqi = p[r][k], lp[r][k], lq_i[r][k]
        if tail == "bucket":
            r_p = teacher.tail_logmass.reshape(-1)[r].double().exp()
            outside = torch.ones(v, dtype=torch.bool)
            outside[idx[r][k]] = False
            log_rq = torch.logsumexp(lq[r][outside], 0)
            row = (pi * (lpi - lqi)).sum() + (r_p * (r_p.log() - log_rq) if r_p > 0 else 0)
        else:
            ph = pi / pi.sum()
            lqh = lqi - torch.logsumexp(lqi, 0) if tail == "renorm_both" else lqi
            row = (ph * (ph.log() - lqh)).sum()
        rows.append(row * T * T)
    rows = torch.stack(rows) * (1 - hard_weight)
    keep = torch.ones_like(rows, dtype=torch.bool)
    if labels is not None:
        lab = labels.reshape(-1)
        keep = lab != ignore_index
        if hard_weight > 0:
            rows = rows + hard_weight * F.cross_entropy(s2, lab, ignore_index=ignore_index, reduction="none")
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows.reshape(s.shape[:-1])
    return rows.sum() if reduction == "sum" else rows.sum() / keep.sum().clamp_min(1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_topk_matches_oracle(backend, tail, reduction):
    s, t = logits((2, 3, 40), torch.float64), logits((2, 3, 40), torch.float64, seed=1)
    teacher = fastkd.topk_teacher(t, k=7, temperature=1.5)
    lab = torch.tensor([[3, -100, 7], [0, 39, -100]])
    opts = dict(reduction=reduction, labels=lab, hard_weight=0.3)
    want, want_g = loss_and_grad(oracle_sparse, s, teacher, tail, **opts)
    got, got_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, tail=tail, backend=backend, **opts)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g.double(), want_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_compiled_backends_match_reference(tail, dtype):
    for backend in CPU_BACKENDS[1:]:
        s = logits((6, 3, 333), dtype)
        teacher = fastkd.topk_teacher(logits((6, 3, 333), dtype, seed=1), k=17, temperature=2.0)
        lab = torch.randint(0, 333, (6, 3))
        lab[::2, 1] = -100
        opts = dict(tail=tail, labels=lab, hard_weight=0.2, reduction="none")
        want, want_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, backend="torch", **opts)
        got, got_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, backend=backend, **opts)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(got_g.double(), want_g.double(), rtol=gtol, atol=gtol * want_g.abs().max().item())


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_full_k_is_dense_forward_kl(tail, dtype):
    s, t = logits((5, 64), dtype), logits((5, 64), dtype, seed=1)
    teacher = fastkd.topk_teacher(t, k=64, temperature=2.0)
    assert torch.isinf(teacher.tail_logmass).all()
    want, want_g = loss_and_grad(fastkd.kd_loss, s, t, temperature=2.0, backend="torch")
    got, got_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, tail=tail)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g.float(), want_g.float(), rtol=1e-2, atol=1e-6)


def test_bucket_is_the_kl_of_the_coarsened_distributions():
    s, t = logits((4, 30), torch.float64), logits((4, 30), torch.float64, seed=1)
    teacher = fastkd.topk_teacher(t, k=5, temperature=1.0)
    got = fastkd.sparse_kd_loss(s, teacher, reduction="none")
    q = torch.softmax(s, -1)
    idx = teacher.indices
    pk, qk = teacher.logprobs.double().exp(), q.gather(-1, idx)  # the teacher as stored (fp32)
    pc = torch.cat([pk, teacher.tail_logmass.double().exp().unsqueeze(-1)], -1)
    qc = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(got, (pc * (pc.log() - qc.log())).sum(-1), rtol=1e-9, atol=1e-12)


def test_topk_teacher_values():
    t = logits((3, 2, 50), torch.float32)
    teacher = fastkd.topk_teacher(t, k=6, temperature=3.0)
    lp = F.log_softmax(t.double() / 3.0, -1)
    torch.testing.assert_close(teacher.logprobs.double(), lp.gather(-1, teacher.indices), rtol=0, atol=1e-6)
    rest = 1 - lp.gather(-1, teacher.indices).exp().sum(-1)
    torch.testing.assert_close(teacher.tail_logmass.double(), rest.log(), rtol=0, atol=1e-5)
    assert teacher.kind == "topk" and teacher.temperature == 3.0
    assert (teacher.logprobs[..., :-1] >= teacher.logprobs[..., 1:]).all()


def test_sparse_teachers_of_masked_rows_have_no_nan():
    """A row with no finite logit gives -inf everywhere (no NaN); a row with fewer finite
    entries than k pads with -inf."""
    t = logits((3, 40))
    t[0] = float("-inf")
    t[1, 3:] = float("-inf")
    teacher = fastkd.topk_teacher(t, k=5, temperature=2.0)
    assert not teacher.logprobs.isnan().any() and not teacher.tail_logmass.isnan().any()
    assert torch.isinf(teacher.logprobs[0]).all() and torch.isinf(teacher.tail_logmass[:2]).all()
    assert torch.isfinite(teacher.logprobs[1, :3]).all() and torch.isinf(teacher.logprobs[1, 3:]).all()
    sampled = fastkd.sample_teacher(t[1:], num_samples=8, temperature=2.0)
    assert set(sampled.indices[0][sampled.logprobs[0] > float("-inf")].tolist()) <= {0, 1, 2}


def test_tiny_tail_stays_finite():
    """A tail mass of ~1e-12 is kept in log space: finite loss and gradient, matching fp64."""
    t = torch.full((2, 100), -30.0)
    t[:, :4] = torch.tensor([0.0, -0.5, -1.0, -1.5])  # tail mass ~ 96 * e^-30 / Z ~ 1e-12
    teacher = fastkd.topk_teacher(t, k=4, temperature=1.0)
    assert torch.isfinite(teacher.tail_logmass).all() and (teacher.tail_logmass < -25).all()
    s = logits((2, 100))
    loss, grad = loss_and_grad(fastkd.sparse_kd_loss, s, teacher)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want = oracle_sparse(s.double(), fastkd.topk_teacher(t.double(), k=4, temperature=1.0), "bucket")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck(backend, tail):
    s = logits((3, 9), torch.float64).requires_grad_(True)
    teacher = fastkd.topk_teacher(logits((3, 9), torch.float64, seed=1), k=3, temperature=1.3)
    lab = torch.tensor([2, -100, 8])
    assert torch.autograd.gradcheck(
        lambda x: fastkd.sparse_kd_loss(x, teacher, tail=tail, labels=lab, hard_weight=0.2, backend=backend), (s,))


def test_sample_teacher_structure():
    t = logits((4, 20), torch.float32)
    st = fastkd.sample_teacher(t, num_samples=12, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert st.kind == "sampled" and st.indices.shape == (4, 12) and torch.isinf(st.tail_logmass).all()
    counts = st.logprobs.exp() * 12
    torch.testing.assert_close(counts.sum(-1), torch.full((4,), 12.0))
    torch.testing.assert_close(counts, counts.round())
    pad = torch.isinf(st.logprobs)
    assert (st.indices[pad] == 0).all()
    for r in range(4):  # unique ids among the real entries
        real = st.indices[r][~pad[r]]
        assert real.unique().numel() == real.numel()


def test_sampled_kd_gradient_is_unbiased():
    """The mean sampled-KD gradient over many draws converges to the dense forward-KL gradient.

    Tolerance: every entry within 5 standard errors of the mean (plus 1e-6); with 4000 draws of
    12 samples over 30 ids, the standard error is about 1e-3 of the largest entry.
    """
    draws, v = 4000, 30
    s, t = logits((1, v), torch.float64), logits((1, v), torch.float64, seed=1)
    st = fastkd.sample_teacher(t.expand(draws, v), num_samples=12, temperature=2.0,
                               generator=torch.Generator().manual_seed(0))
    _, grads = loss_and_grad(fastkd.sparse_kd_loss, s.expand(draws, v).contiguous(), st, reduction="none")
    _, dense = loss_and_grad(fastkd.kd_loss, s, t, temperature=2.0, reduction="none", backend="torch")
    mean, se = grads.mean(0), grads.std(0) / draws**0.5
    assert ((mean - dense[0]).abs() <= 5 * se + 1e-6).all()
    # and not trivially: top-k with the same budget is biased beyond that tolerance
    tk = fastkd.topk_teacher(t, k=3, temperature=2.0)
    _, biased = loss_and_grad(fastkd.sparse_kd_loss, s, tk, tail="renorm_teacher", reduction="none")
    assert ((biased[0] - dense[0]).abs() > 5 * se + 1e-6).any()


@pytest.mark.parametrize(
    "make, kwargs, exc, match",
    [
        (lambda t: fastkd.topk_teacher(t, k=4, temperature=2.0), dict(temperature=1.0), ValueError,
         r"temperature=1.0 differs from the teacher's temperature=2.0"),
        (lambda t: fastkd.topk_teacher(t, k=4, temperature=2.0), dict(divergence="reverse_kl"), ValueError,
         r"supports only 'forward_kl'"),
        (lambda t: fastkd.topk_teacher(t, k=4, temperature=2.0), dict(tail="none"), ValueError, r"unknown tail='none'"),
        (lambda t: fastkd.sample_teacher(t, num_samples=4), dict(tail="renorm_both"), ValueError,
         r"biased for a sampled teacher"),
        (lambda t: fastkd.topk_teacher(t, k=4)._replace(indices=torch.tensor([[0, 1, 2, 10]] * 3)), {}, ValueError,
         r"must lie in \[0, 10\); got 10 at row 0"),
        (lambda t: fastkd.topk_teacher(t, k=4)._replace(indices=torch.tensor([[0, 1, 1, 3]] * 3)), {}, ValueError,
         r"duplicate id 1 in row 0"),
        (lambda t: fastkd.topk_teacher(t, k=4)._replace(indices=torch.zeros(3, 4)), {}, TypeError,
         r"indices must be an integer tensor"),
        (lambda t: fastkd.topk_teacher(t, k=4)._replace(tail_logmass=torch.zeros(4)), {}, ValueError,
         r"tail_logmass must have the student's leading shape"),
        (lambda t: fastkd.topk_teacher(t[:2], k=4), {}, ValueError, r"leading shape \(3,\)"),
        (lambda t: (t,), {}, TypeError, r"teacher must be a fastkd.SparseTeacher"),
        (lambda t: fastkd.topk_teacher(t, k=4), dict(backend="gpu"), ValueError, r"backend='gpu' is not available"),
    ],
)
def test_bad_input(make, kwargs, exc, match):
    s, t = logits((3, 10)), logits((3, 10), seed=1)
    with pytest.raises(exc, match=match):
        fastkd.sparse_kd_loss(s, make(t), **kwargs)


def test_k_larger_than_vocab():
    t = logits((3, 10))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, V=10\], got 11"):
        fastkd.topk_teacher(t, k=11)
    teacher = fastkd.topk_teacher(logits((3, 12)), k=11)
    with pytest.raises(ValueError, match=r"k=11 ids per row but the student's vocabulary has V=10"):
        fastkd.sparse_kd_loss(t, teacher)


def test_compile():
    """The public loss under torch.compile(fullgraph=True); the ops themselves: test_dispatch.py."""
    s = logits((6, 37)).requires_grad_(True)
    tk = fastkd.topk_teacher(logits((6, 37), seed=1), k=5, temperature=2.0)
    lab = torch.tensor([0, -100, 5, 36, 2, -100])

    def f(x):
        return fastkd.sparse_kd_loss(x, tk, labels=lab, hard_weight=0.1)

    want, want_g = loss_and_grad(f, s)
    got, got_g = loss_and_grad(torch.compile(f, fullgraph=True, backend="aot_eager"), s)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_g, want_g)


def test_teacher_compression_compiles():
    t = logits((2, 3, 50))
    f = torch.compile(lambda x: fastkd.topk_teacher(x, k=4, temperature=2.0), fullgraph=True, backend="aot_eager")
    got, want = f(t), fastkd.topk_teacher(t, k=4, temperature=2.0)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.logprobs, want.logprobs)
    g = torch.compile(lambda x: fastkd.sample_teacher(x, 8, 2.0), fullgraph=True, backend="aot_eager")
    assert g(t).indices.shape == (2, 3, 8)


def _far_rows(gap, dtype, tail):
    """Student rows whose mass outside I (bucket) or on I (renorm_both) lies about e^-gap below
    the row's maximum, against a teacher on I = {0..4} with tail mass 0.1."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 50, generator=g, dtype=torch.float64)
    if tail == "bucket":
        s[:, 5:] -= gap
    else:
        s[:, :5] -= gap
        s[:, 40] = 3.0
    p = torch.tensor([0.3, 0.2, 0.2, 0.1, 0.1], dtype=torch.float64)
    teacher = fastkd.SparseTeacher(torch.arange(5).expand(3, 5).contiguous(), p.log().float().expand(3, 5).contiguous(),
                                   torch.full((3,), 0.1).log(), 1.0, "topk")
    return s.to(dtype), teacher


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm_both"])
@pytest.mark.parametrize("gap, dtype", [(150.0, torch.float32), (69.0, torch.float64), (690.0, torch.float64)])
def test_parts_far_below_the_row_maximum(backend, tail, gap, dtype):
    """docs/design.md 2: every tail quantity is a log-sum-exp at its own maximum, so a row whose exact
    loss is finite gets a finite loss and gradient, equal to the float64 oracle's, however far
    its parts lie below the row maximum (relative masses 1e-65 in fp32, 1e-30 and 1e-300 in fp64)."""
    s, teacher = _far_rows(gap, dtype, tail)
    got, got_g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, tail=tail, reduction="none", backend=backend)
    want, want_g = loss_and_grad(oracle_sparse, s.double(), teacher, tail, reduction="none")
    assert torch.isfinite(want).all() and torch.isfinite(got).all() and torch.isfinite(got_g).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_g.double(), want_g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_rows_without_teacher_entries_have_zero_loss_and_gradient(backend, tail):
    """A row with no teacher entry and no tail mass (what sample_teacher makes of a row with no
    finite logit) has no KD term: loss 0 and gradient 0 on every tail, as the dense loss gives."""
    s = logits((3, 20))
    t = logits((3, 20), seed=1)
    t[1] = float("-inf")
    teacher = fastkd.topk_teacher(t, k=4, temperature=2.0)
    loss, grad = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, tail=tail, reduction="none", backend=backend)
    assert loss[1] == 0 and (grad[1] == 0).all() and loss[0] > 0 and grad[0].abs().sum() > 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm_both"])
def test_padding_id_that_repeats_a_real_id_is_not_in_the_teacher(backend, tail):
    """Padding (logprob -inf) with id 0 beside a real id 0 -- as sample_teacher pads -- leaves id 0
    in I: the loss equals that of the same teacher with the padding on an unused id."""
    s = logits((2, 20), torch.float64)
    lp = torch.tensor([[0.6, 0.3, 0.0]] * 2).log()
    lp[:, 2] = float("-inf")
    tail_lp = torch.full((2,), 0.1).log()
    pad_on_0 = fastkd.SparseTeacher(torch.tensor([[0, 5, 0]] * 2), lp, tail_lp, 1.0, "topk")
    pad_on_9 = fastkd.SparseTeacher(torch.tensor([[0, 5, 9]] * 2), lp, tail_lp, 1.0, "topk")
    got, got_g = loss_and_grad(fastkd.sparse_kd_loss, s, pad_on_0, tail=tail, backend=backend)
    want, want_g = loss_and_grad(fastkd.sparse_kd_loss, s, pad_on_9, tail=tail, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_g, want_g, rtol=1e-12, atol=1e-15)
