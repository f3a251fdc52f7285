"""Every op of the dispatch table (fastkd/backends.py) on every available backend, against backend
"torch", from one table of sample inputs per op (tests/samples.py): values, gradients through
autograd, torch.library.opcheck and torch.compile(fullgraph=True). A new backend is covered by its
table entries alone. Triton runs here on CPU tensors in its interpreter (TRITON_INTERPRET=1, set
by conftest.py when no GPU is visible)."""
import pytest
import torch

import fastkd
from fastkd import backends
from samples import DTYPES, FLOAT_OPS, PARTIAL_OPS, SAMPLES

AVAILABLE = fastkd.available_backends()
GPU_BACKENDS = tuple(b.name for b in backends.RECORDS.values() if "cuda" in b.devices and b.name != "torch")


def device_of(backend):
    return "cuda" if backend in GPU_BACKENDS and torch.cuda.is_available() else "cpu"


def _to(args, device):
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _cases(first_only=False):
    out = []
    for op, impls in backends.OPS.items():
        for backend in impls:
            if backend == "torch" or backend not in AVAILABLE:
                continue
            if backend == "cuda" and not torch.cuda.is_available():
                continue
            for dtype in (DTYPES if op in FLOAT_OPS else (None,)):
                samples = SAMPLES[op](dtype) if dtype else SAMPLES[op]()
                for name, args in samples[:1] if first_only else samples:
                    out.append(pytest.param(op, backend, args, id=f"{op}-{backend}-{str(dtype)[6:]}-{name}"))
                if first_only:
                    break
    return out


def _op(op, backend):
    backends.register(op, backend)
    return getattr(torch.ops.fastkd, backends.qualname(op, backend))


def _run(fn, args):
    """fn(*args) on fresh copies of the tensors -> its outputs, or for an op that writes its first
    argument in place (dense_kd_finish: `-> ()`), that argument."""
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    out = fn(*args)
    return args[0] if out is None else out


def _tolerance(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}[dtype]


def _check_row_loss(got, want, student):
    (loss, grad), (want_loss, want_grad) = got, want
    assert loss.dtype == want_loss.dtype and grad.dtype == want_grad.dtype and grad.shape == want_grad.shape
    tol = _tolerance(student.dtype)
    torch.testing.assert_close(loss.cpu(), want_loss, rtol=tol, atol=tol)
    if want_grad.numel():
        gtol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[student.dtype]
        scale = want_grad.double().abs().max().item()
        torch.testing.assert_close(grad.cpu().double(), want_grad.double(), rtol=gtol, atol=gtol * scale)
    assert not grad.isnan().any()


def _check_topk(got, want, logits):
    (ids, lp, tail), (want_ids, want_lp, want_tail) = [tuple(x.cpu() for x in r) for r in (got, want)]
    finite = want_lp > float("-inf")
    assert torch.equal(lp > float("-inf"), finite) and not lp.isnan().any()
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=4e-6)  # both largest first
    exact = torch.log_softmax(logits.cpu().double() / 1.0, -1)  # ids must name their values
    gathered = torch.log_softmax(logits.cpu().double(), -1).gather(-1, ids)
    want_gathered = exact.gather(-1, want_ids)
    torch.testing.assert_close(gathered[finite], want_gathered[finite], rtol=0, atol=1e-5)  # ties may swap ids
    torch.testing.assert_close(tail, want_tail, rtol=0, atol=4e-5)


def _check(op, got, want, args):
    if op in ("dense_kd", "sparse_kd"):
        _check_row_loss(got, want, args[0])
    elif op == "topk_teacher":
        _check_topk(got, want, args[0])
    elif op in PARTIAL_OPS:  # the vocab-parallel partial forms: every output to the dtype's rounding
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            rtol = atol = _tolerance(args[0].dtype) * 10
            if w.dtype in (torch.bfloat16, torch.float16):  # a half-precision gradient: to a rounding step
                rtol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}[w.dtype]  # of its largest entry
                atol = rtol * (w.double().nan_to_num(0.0, 0.0, 0.0).abs().max().item() if w.numel() else 0.0)
            torch.testing.assert_close(g.cpu().double(), w.double(), rtol=rtol, atol=atol, equal_nan=True)
    elif op == "sample_teacher_draws":
        assert got.dtype == torch.long and got.shape == want.shape
        assert (got.cpu() != want).float().mean() <= 0.05  # a draw within rounding of a CDF step may move
    else:
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("op, backend, args", _cases())
def test_values(op, backend, args):
    want = _run(_op(op, "torch"), args)
    got = _run(_op(op, backend), _to(args, device_of(backend)))
    _check(op, got, want, args)


@pytest.mark.parametrize("op, backend, args", [c for c in _cases() if c.values[0] in ("dense_kd", "sparse_kd")])
def test_gradients_through_autograd(op, backend, args):
    """backward of the reduced loss: the kept gradient, scaled by grad_output / grad_scale."""
    grads = []
    for b, dev in (("torch", "cpu"), (backend, device_of(backend))):
        x = args[0].detach().to(dev).requires_grad_(True)
        loss, _ = _op(op, b)(x, *_to(args[1:], dev))
        weights = torch.linspace(0.5, 2.0, loss.numel(), device=dev, dtype=loss.dtype)
        (loss * weights).sum().backward()
        grads.append(x.grad.cpu())
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[args[0].dtype]
    scale = grads[0].double().abs().amax().item() if grads[0].numel() else 0.0
    torch.testing.assert_close(grads[1].double(), grads[0].double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("op, backend, args", _cases(first_only=True))
def test_opcheck(op, backend, args):
    args = _to(args, device_of(backend))
    if op in ("dense_kd", "sparse_kd"):
        args = (args[0].detach().requires_grad_(True),) + args[1:]
    torch.library.opcheck(_op(op, backend), args)


@pytest.mark.parametrize("op, backend, args", _cases(first_only=True))
def test_torch_compile_fullgraph(op, backend, args):
    fn = _op(op, backend)
    args = _to(args, device_of(backend))
    torch._dynamo.reset()  # one code object compiled for many ops: start each from a clean cache
    compiled = torch.compile(lambda *a: fn(*a), fullgraph=True, backend="aot_eager")
    _check(op, _run(compiled, args), _run(_op(op, "torch"), _to(args, "cpu")), args)


def test_every_op_has_a_reference_and_samples():
    for op, impls in backends.OPS.items():
        assert impls[0] == "torch" and op in SAMPLES
        assert hasattr(torch.ops.fastkd, backends.qualname(op, "torch"))


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "torch"])
def test_public_functions_on_every_backend(backend):
    """kd_loss, sparse_kd_loss, topk_teacher and sample_teacher with backend= named, any leading
    shape, against backend "torch"."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 70, generator=g), torch.randn(2, 3, 70, generator=g)
    labels = torch.randint(0, 70, (2, 3), generator=g)
    labels[0, 1] = -100
    on = dict(backend=backend)
    for fn in (fastkd.kd_loss, fastkd.sparse_kd_loss):
        teacher = t if fn is fastkd.kd_loss else fastkd.topk_teacher(t, k=6, temperature=2.0, backend="torch")
        extra = dict(temperature=2.0) if fn is fastkd.kd_loss else {}
        x = s.clone().requires_grad_(True)
        fn(x, teacher, labels=labels, hard_weight=0.2, **extra, backend="torch").backward()
        y = s.to(dev).detach().requires_grad_(True)
        moved = teacher.to(dev) if fn is fastkd.kd_loss else fastkd.SparseTeacher(
            *(f.to(dev) for f in teacher[:3]), teacher.temperature, teacher.kind)
        loss = fn(y, moved, labels=labels.to(dev), hard_weight=0.2, **extra, **on)
        loss.backward()
        torch.testing.assert_close(y.grad.cpu(), x.grad, rtol=1e-5, atol=1e-7)
    if backend in backends.OPS["topk_teacher"]:
        got = fastkd.topk_teacher(t.to(dev), k=6, temperature=2.0, **on)
        want = fastkd.topk_teacher(t, k=6, temperature=2.0, backend="torch")
        assert got.indices.shape == (2, 3, 6) and torch.equal(got.indices.cpu(), want.indices)
        drawn = fastkd.sample_teacher(t.to(dev), 8, 2.0, generator=torch.Generator(dev).manual_seed(1), **on)
        assert drawn.indices.shape == (2, 3, 8) and drawn.kind == "sampled"


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "torch"])
@pytest.mark.parametrize("ignore_index", [-1, -100, 0])
def test_without_labels_no_row_is_ignored(backend, ignore_index):
    """Without labels ignore_index names nothing to ignore (the Triton kernels' stand-in label, -1,
    once equalled a user's ignore_index=-1 and made every row's loss 0)."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    dev = device_of(backend)
    teacher = fastkd.topk_teacher(t, 5, backend="torch")
    on_dev = teacher._replace(**{f: v.to(dev) for f, v in teacher._asdict().items() if isinstance(v, torch.Tensor)})
    pairs = [(fastkd.kd_loss(s, t, ignore_index=ignore_index, backend="torch"),
              fastkd.kd_loss(s.to(dev), t.to(dev), ignore_index=ignore_index, backend=backend)),
             (fastkd.sparse_kd_loss(s, teacher, ignore_index=ignore_index, backend="torch"),
              fastkd.sparse_kd_loss(s.to(dev), on_dev, ignore_index=ignore_index, backend=backend))]
    for want, got in pairs:
        assert want > 0.01
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
