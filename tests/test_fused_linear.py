"""fastkd.fused_linear_kd_loss against the materialised path (logits = h W^T + b, soft-capped,
then kd_loss / sparse_kd_loss on backend "torch"), in float64: values and the gradients of the
hidden states, the weight and the bias, for every option, on every backend; and vocab_size= on
every loss (padded LM heads)."""
import pytest
import torch

import fastkd
from conftest import device_of, loss_and_grad, on

BACKENDS = fastkd.backends.available_for("cpu")  # (triton: in its interpreter here)
G = torch.Generator().manual_seed(0)


def _rand(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=G, dtype=torch.float64) * scale).to(dtype)


def _materialised(h, w, b, th, tw, tb, softcap, vocab, teacher, **opts):
    z = h @ w[:vocab].T + (0 if b is None else b[:vocab])
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    if teacher is not None:
        return fastkd.sparse_kd_loss(z, teacher, backend="torch", **opts)
    t = th @ tw[:vocab].T + (0 if tb is None else tb[:vocab])
    if softcap:
        t = torch.tanh(t / softcap) * softcap
    return fastkd.kd_loss(z, t, backend="torch", **opts)


def _grads(fn, *leaves):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in leaves]
    loss = fn(*leaves)
    real = [x for x in leaves if x is not None]
    return loss.detach(), torch.autograd.grad(loss.sum(), real)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", fastkd.DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap, bias, vocab", [(None, True, None), (4.0, False, 28)])
def test_dense_teacher_matches_materialised(backend, divergence, reduction, softcap, bias, vocab):
    h, w = _rand(2, 5, 8), _rand(30, 8)
    th, tw = _rand(2, 5, 6), _rand(32 if vocab else 30, 6)
    b = _rand(30) if bias else None
    tb = _rand(tw.shape[0]) if bias else None
    labels = torch.randint(0, vocab or 30, (2, 5), generator=G)
    labels[0, 1] = -100
    opts = dict(temperature=2.0, divergence=divergence, beta=0.3, labels=labels, hard_weight=0.25,
                reduction=reduction, vocab_size=vocab)
    want, want_g = _grads(lambda h, w, b: _materialised(h, w, b, th, tw, tb, softcap, vocab or 30, None, **{
        k: v for k, v in opts.items() if k != "vocab_size"}), h, w, b)
    dev = device_of(backend)
    th, tw, tb, opts["labels"] = on(dev, th, tw, tb, labels)
    got, got_g = _grads(lambda h, w, b: fastkd.fused_linear_kd_loss(
        h, w, student_bias=b, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, softcap=softcap,
        chunk_size=3, backend=backend, **opts), *on(dev, h, w, b))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)
    for x, y in zip(got_g, want_g):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-8, atol=1e-11)
    if vocab:
        assert (got_g[1][vocab:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renorm_teacher", "renorm_both"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_sparse_teacher_matches_materialised(backend, tail, reduction):
    h, w, b = _rand(3, 4, 8), _rand(40, 8), _rand(40)
    teacher = fastkd.topk_teacher(_rand(3, 4, 40, scale=3.0), k=6, temperature=1.5)
    labels = torch.randint(0, 40, (3, 4), generator=G)
    labels[1, 2] = -100
    opts = dict(tail=tail, labels=labels, hard_weight=0.1, reduction=reduction)
    want, want_g = _grads(lambda h, w, b: _materialised(h, w, b, None, None, None, 3.0, 40, teacher, **opts), h, w, b)
    dev = device_of(backend)
    teacher, opts["labels"] = on(dev, teacher, labels)
    got, got_g = _grads(lambda h, w, b: fastkd.fused_linear_kd_loss(
        h, w, student_bias=b, teacher=teacher, softcap=3.0, chunk_size=5, backend=backend, **opts), *on(dev, h, w, b))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)
    for x, y in zip(got_g, want_g):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_weights_accumulate_in_fp32(dtype):
    """bf16/fp16 heads: the weight gradient over many chunks is accumulated in fp32, so it stays
    close to the fp64 one of the same rounded inputs."""
    h, w = _rand(64, 16, dtype=dtype), _rand(50, 16, dtype=dtype, scale=0.5)
    th, tw = _rand(64, 16, dtype=dtype), _rand(50, 16, dtype=dtype, scale=0.5)
    got, (gh, gw) = _grads(lambda h, w: fastkd.fused_linear_kd_loss(
        h, w, teacher_hidden=th, teacher_weight=tw, temperature=2.0, chunk_size=4), h, w)
    want, (wh, ww) = _grads(lambda h, w: fastkd.fused_linear_kd_loss(
        h, w, teacher_hidden=th.double(), teacher_weight=tw.double(), temperature=2.0), h.double(), w.double())
    assert gh.dtype == dtype and gw.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(gw.double(), ww, rtol=tol, atol=tol * ww.abs().max().item())
    torch.testing.assert_close(gh.double(), wh, rtol=tol, atol=tol * wh.abs().max().item())


def test_autocast_and_module_and_auto_chunk():
    h, w = _rand(6, 8, dtype=torch.float32), _rand(20, 8, dtype=torch.float32)
    th, tw = _rand(6, 8, dtype=torch.float32), _rand(20, 8, dtype=torch.float32)
    m = fastkd.FusedLinearKDLoss(temperature=2.0)
    plain = m(h, w, teacher_hidden=th, teacher_weight=tw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = m(h, w, teacher_hidden=th, teacher_weight=tw)
    assert abs(cast.item() - plain.item()) < 5e-2 * plain.item() and "temperature=2.0" in repr(m)
    assert fastkd.fused_linear_kd.auto_chunk_rows(4096, 32000, 4, torch.device("cpu")) == (256 << 20) // (3 * 32000 * 4)
    assert fastkd.fused_linear_kd.auto_chunk_rows(10, 32000, 2, torch.device("cpu")) == 10


def test_bad_input():
    h, w = _rand(4, 8), _rand(20, 8)
    th, tw = _rand(4, 6), _rand(22, 6)
    with pytest.raises(ValueError, match="student_weight has V=20, teacher_weight has V=22.*vocab_size"):
        fastkd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(ValueError, match="either as teacher_hidden"):
        fastkd.fused_linear_kd_loss(h, w)
    with pytest.raises(ValueError, match=r"student_weight must be \[V, H\]"):
        fastkd.fused_linear_kd_loss(h, w.T, teacher_hidden=th, teacher_weight=tw, vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size=30 exceeds"):
        fastkd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, vocab_size=30)
    with pytest.raises(ValueError, match="softcap"):
        fastkd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, vocab_size=20, softcap=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_on_every_loss(backend):
    """Heads padded to different sizes over one tokenizer: the loss over the first V columns,
    zero gradient past them; without vocab_size the mismatch is an error naming both sizes."""
    s, t = on(device_of(backend), _rand(3, 24, dtype=torch.float32), _rand(3, 26, dtype=torch.float32))
    with pytest.raises(ValueError, match="student_logits has V=24, teacher_logits has V=26.*vocab_size"):
        fastkd.kd_loss(s, t, backend=backend)
    got, g = loss_and_grad(fastkd.kd_loss, s, t, vocab_size=20, temperature=2.0, backend=backend)
    want, wg = loss_and_grad(fastkd.kd_loss, s[:, :20].contiguous(), t[:, :20].contiguous(), temperature=2.0,
                             backend="torch")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g[:, :20], wg)
    assert (g[:, 20:] == 0).all()
    teacher = fastkd.topk_teacher(t[:, :20], k=4, temperature=1.0)
    got, g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, vocab_size=20, backend=backend)
    want, wg = loss_and_grad(fastkd.sparse_kd_loss, s[:, :20].contiguous(), teacher, backend="torch")
    torch.testing.assert_close(got, want)
    assert (g[:, 20:] == 0).all()


def _split(z, t_top1, labels, kd_rows, keep):
    """kd_loss, ce_loss, top1_agreement, student_entropy means over the kept rows, from logits."""
    q = torch.log_softmax(z, -1)
    out = {"kd_loss": kd_rows[keep].mean().item(),
           "top1_agreement": (z.argmax(-1) == t_top1)[keep].double().mean().item(),
           "student_entropy": -(q.exp() * q).sum(-1)[keep].mean().item()}
    if labels is not None:
        out["ce_loss"] = -q.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].mean().item()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hard_weight, softcap, with_labels, sparse",
                         [(0.0, None, True, False), (0.4, 3.0, True, False), (0.0, None, False, False),
                          (0.25, None, True, True), (1.0, None, True, False)])
@pytest.mark.slow
def test_metrics_are_those_of_the_materialised_logits(backend, hard_weight, softcap, with_labels, sparse):
    """return_metrics: the KD / CE split, top-1 agreement and entropy of the kept rows, measured in
    the chunk loop, equal those of the materialised logits; the loss is unchanged."""
    h, w, th, tw = _rand(23, 8), _rand(40, 8), _rand(23, 6), _rand(40, 6, scale=2.0)
    labels = torch.randint(0, 40, (23,), generator=G) if with_labels else None
    if with_labels:
        labels[::4] = -100
    z = h @ w.T
    t = th @ tw.T
    if softcap:
        z, t = torch.tanh(z / softcap) * softcap, torch.tanh(t / softcap) * softcap
    keep = torch.ones(23, dtype=torch.bool) if labels is None else labels != -100
    opts = dict(temperature=2.0, labels=labels, hard_weight=hard_weight, softcap=softcap, chunk_size=5)
    dev = device_of(backend)
    if sparse:
        teacher = fastkd.topk_teacher(t, k=6, temperature=2.0, backend="torch")
        kd_rows = fastkd.sparse_kd_loss(z, teacher, reduction="none", backend="torch")
        t_top1 = teacher.indices[:, 0]
        plain = dict(teacher=on(dev, teacher)[0])
    else:
        kd_rows = fastkd.kd_loss(z, t, temperature=2.0, reduction="none", backend="torch")
        t_top1 = t.argmax(-1)
        plain = dict(zip(("teacher_hidden", "teacher_weight"), on(dev, th, tw)))
    if with_labels:
        opts["labels"] = on(dev, labels)[0]
    hd, wd = on(dev, h, w)
    loss, metrics = fastkd.fused_linear_kd_loss(hd, wd, backend=backend, return_metrics=True, **plain, **opts)
    assert torch.equal(loss, fastkd.fused_linear_kd_loss(hd, wd, backend=backend, **plain, **opts))
    want = _split(z, t_top1, labels, kd_rows, keep)
    if hard_weight == 1.0:  # labels only: no KD term to separate
        del want["kd_loss"]
    got = metrics.means()
    assert got.keys() == want.keys() and int(metrics.rows) == int(keep.sum())
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


def test_metrics_add_up_and_survive_edge_rows():
    """Two calls' metrics add to those of one call over both; a backward of reduction 'none' (which
    replays the chunk loop) does not count rows twice; a masked or all -inf student row gives no
    NaN; no kept row gives {} (a sharded call refuses them: tests/distributed_cases.py)."""
    h, w, th, tw = _rand(12, 8), _rand(30, 8), _rand(12, 8), _rand(30, 8)
    labels = torch.randint(0, 30, (12,), generator=G)
    kw = dict(teacher_hidden=th, teacher_weight=tw, labels=labels, temperature=2.0, return_metrics=True)
    _, whole = fastkd.fused_linear_kd_loss(h, w, **kw)
    _, a = fastkd.fused_linear_kd_loss(h[:5], w, **{**kw, "teacher_hidden": th[:5], "labels": labels[:5]})
    _, b = fastkd.fused_linear_kd_loss(h[5:], w, **{**kw, "teacher_hidden": th[5:], "labels": labels[5:]})
    for name, value in whole.means().items():
        assert (a + b).means()[name] == pytest.approx(value, rel=1e-9), name
    hg = h.clone().requires_grad_(True)
    loss, m = fastkd.fused_linear_kd_loss(hg, w, reduction="none", chunk_size=5, **kw)
    loss.sum().backward()
    assert int(m.rows) == 12 and m.means() == pytest.approx(whole.means(), rel=1e-9)
    w_masked = w.clone()
    w_masked[3] = 0
    b = torch.zeros(30, dtype=torch.float64)
    b[3] = float("-inf")  # id 3 masked in the student
    _, m = fastkd.fused_linear_kd_loss(h, w_masked, student_bias=b, **{**kw, "labels": None})
    assert all(v == v for v in m.means().values())
    _, m = fastkd.fused_linear_kd_loss(h, w, **{**kw, "labels": torch.full((12,), -100)})
    assert m.means() == {} and "rows=0" in repr(m)
    with pytest.raises(TypeError, match="return_metrics"):
        fastkd.fused_linear_kd_loss(h, w, **{**kw, "return_metrics": 1})


def test_metrics_from_the_module_and_in_bf16():
    """FusedLinearKDLoss(..., return_metrics=True) gives the function's metrics; in bf16 they are
    those of the fp32 computation to bf16's rounding."""
    h, w, th, tw = _rand(16, 8), _rand(40, 8), _rand(16, 8), _rand(40, 8)
    labels = torch.randint(0, 40, (16,), generator=G)
    kw = dict(teacher_hidden=th, teacher_weight=tw, labels=labels)
    loss, m = fastkd.FusedLinearKDLoss(temperature=2.0, chunk_size=5)(h, w, return_metrics=True, **kw)
    want_loss, want = fastkd.fused_linear_kd_loss(h, w, temperature=2.0, chunk_size=5, return_metrics=True, **kw)
    assert torch.equal(loss, want_loss) and m.means() == want.means()
    bf = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
    _, low = fastkd.fused_linear_kd_loss(h.to(torch.bfloat16), w.to(torch.bfloat16), temperature=2.0,
                                         return_metrics=True, **bf)
    for name, value in want.means().items():
        assert low.means()[name] == pytest.approx(value, rel=0.05, abs=0.05), name
