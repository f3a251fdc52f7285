"""fastkd.fused_linear_kd_loss against the materialised path (logits = h W^T + b, soft-capped,
then kd_loss / sparse_kd_loss on backend "torch"), in float64: values and the gradients of the
hidden states, the weight and the bias, for every option, on every backend; and vocab_size= on
every loss (padded LM heads)."""
import pytest
import torch

import fastkd
from conftest import device_of, loss_and_grad, on

BACKENDS = [b for b in fastkd.available_backends() if b in ("torch", "cpu", "triton")]
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
    want, wg = loss_and_grad(fastkd.kd_loss, s[:, :20].contiguous(), t[:, :20].contiguous(), temperature=2.0, backend="torch")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g[:, :20], wg)
    assert (g[:, 20:] == 0).all()
    teacher = fastkd.topk_teacher(t[:, :20], k=4, temperature=1.0)
    got, g = loss_and_grad(fastkd.sparse_kd_loss, s, teacher, vocab_size=20, backend=backend)
    want, wg = loss_and_grad(fastkd.sparse_kd_loss, s[:, :20].contiguous(), teacher, backend="torch")
    torch.testing.assert_close(got, want)
    assert (g[:, 20:] == 0).all()
