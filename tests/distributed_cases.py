"""The vocab-parallel cases that tests/test_distributed.py runs in spawned processes (gloo over a
file:// rendezvous): every rank builds the same full-vocabulary inputs, computes the unsharded
loss with backend "torch", and checks the sharded call on its own slice against it. A rank that
finds a difference raises, which mp.spawn reports in the test process. The collectives are
wrapped to count the bytes each step sends (COUNTED)."""
import datetime
import math
import time

import torch
import torch.distributed as dist

NEG_INF = float("-inf")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


class Counted:
    """Wraps torch.distributed's collectives (the ones fastkd.distributed looks up at call time)
    and records (name, bytes of this rank's tensor) per call, and the seconds spent in them."""

    def __init__(self):
        self.calls = []
        self.seconds = 0.0
        self._orig = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_object")}
        for name, fn in self._orig.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            t = args[1] if name == "all_gather" else args[0]
            self.calls.append((name, t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0))
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapped

    def take(self):
        calls, self.calls, self.seconds = self.calls, [], 0.0
        return calls


def _close(got, want, what, tol):
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True):
        err = (got - want).abs().nan_to_num(math.inf).max().item() if got.shape == want.shape else "shape"
        raise AssertionError(f"{what}: sharded differs from unsharded (max err {err})")


def _data(n, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    t = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[2] = -100
    return s, t, labels


def _pair(fn_full, fn_shard, x, cols, what, tol):
    """Loss and gradient of the full call on x and of the sharded call on x[..., cols]."""
    a = x.clone().requires_grad_()
    want = fn_full(a)
    (want.sum() if want.dim() else want).backward()
    b = x[..., cols].clone().requires_grad_()
    got = fn_shard(b)
    (got.sum() if got.dim() else got).backward()
    _close(got, want, f"{what} loss", tol)
    _close(b.grad, a.grad[..., cols], f"{what} gradient", tol)


def dense_cases(shard, cols, vocab, backend="auto"):
    import fastkd

    s, t, labels = _data(7, vocab, torch.float64)
    for div in DIVERGENCES:
        for opts in (dict(), dict(labels=labels, hard_weight=0.3, temperature=2.0, reduction="sum"),
                     dict(labels=labels, temperature=0.5, reduction="none", beta=0.2)):
            if div == "jsd" and opts.get("beta") == 0.2:
                opts = dict(opts, beta=0.7)
            kw = dict(divergence=div, **opts)
            _pair(lambda x: fastkd.kd_loss(x, t, backend="torch", **kw),
                  lambda x: fastkd.kd_loss(x, t[:, cols], vocab_shard=shard, backend=backend, **kw), s, cols,
                  f"dense {kw}", 1e-10)
    # fp32 and bf16 logits: the same as the unsharded loss to their rounding
    # (JSD: its gradient needs U -- dense_kd_finish after the shares for fp32, a second shard pass for bf16)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-3)):
        s, t, labels = _data(5, vocab, dtype, seed=1)
        for div in ("forward_kl", "jsd"):
            _pair(lambda x: fastkd.kd_loss(x, t, labels=labels, divergence=div, hard_weight=0.1, backend="torch"),
                  lambda x: fastkd.kd_loss(x, t[:, cols], labels=labels, divergence=div, hard_weight=0.1,
                                           vocab_shard=shard, backend=backend), s, cols, f"dense {dtype} {div}", tol)
    # masked entries, a row fully masked, a NaN row, 1e4-scale logits, a close (converged) row
    s, t, labels = _data(6, vocab, torch.float64, seed=2)
    s[:, ::5] = NEG_INF
    t[:, 1::7] = NEG_INF
    s[1] = NEG_INF
    t[3, vocab // 2] = math.nan
    s[4] *= 3e3
    t[5] = s[5] + 1e-3 * torch.randn(vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    for div in ("forward_kl", "jsd", "tvd", "reverse_kl"):  # (reverse KL: teacher masks under student mass, U = inf)
        _pair(lambda x: fastkd.kd_loss(x, t, divergence=div, reduction="none", backend="torch"),
              lambda x: fastkd.kd_loss(x, t[:, cols], divergence=div, reduction="none", vocab_shard=shard,
                                       backend=backend),
              s, cols, f"dense edge rows {div}", 1e-9)


def sparse_cases(shard, cols, vocab, backend="auto"):
    import fastkd

    s, t, labels = _data(7, vocab, torch.float64, seed=3)
    topk = fastkd.topk_teacher(t, 6, temperature=2.0)
    sampled = fastkd.sample_teacher(t, 5, temperature=2.0, generator=torch.Generator().manual_seed(4))
    for teacher, tails in ((topk, ("bucket", "renorm_teacher", "renorm_both")), (sampled, ("renorm_teacher",))):
        for tail in tails:
            for opts in (dict(), dict(labels=labels, hard_weight=0.25, reduction="none")):
                kw = dict(tail=tail, **opts)
                _pair(lambda x: fastkd.sparse_kd_loss(x, teacher, backend="torch", **kw),
                      lambda x: fastkd.sparse_kd_loss(x, teacher, vocab_shard=shard, backend=backend, **kw), s, cols,
                      f"sparse {teacher.kind} {kw}", 1e-10)


def fused_cases(shard, cols, vocab):
    import fastkd

    g = torch.Generator().manual_seed(5)
    n, hid = 9, 8
    h, th = (torch.randn(n, hid, generator=g, dtype=torch.float64) for _ in range(2))
    w, tw = (torch.randn(vocab, hid, generator=g, dtype=torch.float64) for _ in range(2))
    b = torch.randn(vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[0] = -100
    for div, red in (("forward_kl", "mean"), ("reverse_kl", "sum")):
        kw = dict(divergence=div, reduction=red, labels=labels, hard_weight=0.2, chunk_size=4, softcap=3.0)
        full = [x.clone().requires_grad_() for x in (h, w, b)]
        part = [h.clone().requires_grad_(), w[cols].clone().requires_grad_(), b[cols].clone().requires_grad_()]
        want = fastkd.fused_linear_kd_loss(full[0], full[1], student_bias=full[2], teacher_hidden=th,
                                           teacher_weight=tw, backend="torch", **kw)
        got = fastkd.fused_linear_kd_loss(part[0], part[1], student_bias=part[2], teacher_hidden=th,
                                          teacher_weight=tw[cols], vocab_shard=shard, **kw)
        want.sum().backward()
        got.sum().backward()
        _close(got, want, f"fused {div} loss", 1e-10)
        _close(part[0].grad, full[0].grad, "fused grad_hidden", 1e-10)
        _close(part[1].grad, full[1].grad[cols], "fused grad_weight", 1e-10)
        _close(part[2].grad, full[2].grad[cols], "fused grad_bias", 1e-10)
    teacher = fastkd.topk_teacher(th @ tw.T, 4)
    full = [x.clone().requires_grad_() for x in (h, w)]
    part = [h.clone().requires_grad_(), w[cols].clone().requires_grad_()]
    want = fastkd.fused_linear_kd_loss(*full, teacher=teacher, tail="renorm_teacher", chunk_size=3, backend="torch")
    got = fastkd.fused_linear_kd_loss(*part, teacher=teacher, tail="renorm_teacher", chunk_size=3, vocab_shard=shard)
    want.backward()
    got.backward()
    _close(got, want, "fused sparse loss", 1e-10)
    _close(part[0].grad, full[0].grad, "fused sparse grad_hidden", 1e-10)
    _close(part[1].grad, full[1].grad[cols], "fused sparse grad_weight", 1e-10)


def padded_cases(shard, cols, vocab):
    """vocab_size: a head padded past the tokenizer (Megatron pads to a multiple of the ranks):
    the loss over the first vocab_size ids, zero gradient past them, on every slice."""
    import fastkd

    used = vocab - 3
    s, t, labels = _data(5, vocab, torch.float64, seed=6)
    labels[labels >= used] = 0
    _pair(lambda x: fastkd.kd_loss(x, t, vocab_size=used, labels=labels, hard_weight=0.5, backend="torch"),
          lambda x: fastkd.kd_loss(x, t[:, cols], vocab_size=used, labels=labels, hard_weight=0.5, vocab_shard=shard),
          s, cols, "dense vocab_size", 1e-10)


def explicit_layout_cases(sizes, rank, cols, vocab):
    """VocabShard(start=, total=) with the slices given out of rank order."""
    import fastkd
    from fastkd.distributed import VocabShard

    order = list(reversed(range(len(sizes))))  # rank r holds the r-th slice counted from the end
    starts, at = {}, 0
    for r in order:
        starts[r] = at
        at += sizes[r]
    mine = slice(starts[rank], starts[rank] + sizes[rank])
    shard = VocabShard(start=starts[rank], total=vocab)
    s, t, labels = _data(4, vocab, torch.float64, seed=7)
    _pair(lambda x: fastkd.kd_loss(x, t, labels=labels, hard_weight=0.4, backend="torch"),
          lambda x: fastkd.kd_loss(x, t[:, mine], labels=labels, hard_weight=0.4, vocab_shard=shard),
          s, mine, "explicit start/total", 1e-10)


def _refused_everywhere(fn, *needles):
    try:
        fn()
    except ValueError as e:
        for needle in needles:
            if needle not in str(e):
                raise AssertionError(f"the error does not say {needle!r}: {e}") from e
        return
    raise AssertionError(f"no error (expected one naming {needles})")


def error_cases(shard, rank, cols, vocab):
    """Every rank raises; none is left waiting in a collective (the test's timeout would say so)."""
    import fastkd
    from fastkd.distributed import VocabShard

    s, t, labels = _data(6, vocab, torch.float32, seed=8)
    # a different N on one rank
    n = 5 if rank == 1 else 6
    _refused_everywhere(lambda: fastkd.kd_loss(s[:n, cols], t[:n, cols], vocab_shard=shard),
                        "different numbers of rows")
    # a bad argument on one rank only
    temp = -1.0 if rank == 1 else 1.0
    _refused_everywhere(lambda: fastkd.kd_loss(s[:, cols], t[:, cols], temperature=temp, vocab_shard=shard),
                        "rank 1", "temperature")
    # different options
    div = "jsd" if rank == 0 else "forward_kl"
    _refused_everywhere(lambda: fastkd.kd_loss(s[:, cols], t[:, cols], divergence=div, vocab_shard=shard),
                        "different options")
    # a label outside [0, total) (it fits some rank's slice size, not the whole vocabulary)
    bad = labels.clone()
    bad[3] = vocab + 2
    _refused_everywhere(lambda: fastkd.kd_loss(s[:, cols], t[:, cols], labels=bad, vocab_shard=shard),
                        f"[0, {vocab})", "row 3")
    # sparse ids outside the vocabulary
    teacher = fastkd.topk_teacher(t.double(), 3)
    teacher.indices[2, 1] = vocab
    _refused_everywhere(lambda: fastkd.sparse_kd_loss(s[:, cols], teacher, vocab_shard=shard), "teacher.indices",
                        "row 2")
    # an error of any type on one rank (an AttributeError here: a teacher with no logprobs)
    broken = teacher._replace(logprobs=None) if rank == 1 else teacher
    _refused_everywhere(lambda: fastkd.sparse_kd_loss(s[:, cols], broken, vocab_shard=shard), "rank 1",
                        "AttributeError")
    # fused linear's reduction="none" would run collectives in backward: refused on every rank
    g = torch.Generator().manual_seed(11)
    h, w = torch.randn(6, 4, generator=g), torch.randn(vocab, 4, generator=g)
    _refused_everywhere(lambda: fastkd.fused_linear_kd_loss(h, w[cols], teacher_hidden=h, teacher_weight=w[cols],
                                                            reduction="none", vocab_shard=shard),
                        "reduction='none'", "collectives")
    # metrics need whole rows of logits, which no rank holds
    _refused_everywhere(lambda: fastkd.fused_linear_kd_loss(h, w[cols], teacher_hidden=h, teacher_weight=w[cols],
                                                            return_metrics=True, vocab_shard=shard),
                        "return_metrics=True", "slice")
    # ranks passing different labels, or different sparse-teacher ids, would return different losses
    other = labels.clone()
    if rank == 1:
        other[4] = (other[4] + 1) % vocab
    _refused_everywhere(lambda: fastkd.kd_loss(s[:, cols], t[:, cols], labels=other, vocab_shard=shard),
                        "different labels or sparse-teacher ids")
    teacher = fastkd.topk_teacher(t.double(), 3)
    if rank == 1:
        teacher.indices[1, 0] = (teacher.indices[1, 0] + 1) % vocab
    _refused_everywhere(lambda: fastkd.sparse_kd_loss(s[:, cols], teacher, vocab_shard=shard),
                        "different labels or sparse-teacher ids")
    h, w = torch.randn(6, 4, generator=g), torch.randn(vocab, 4, generator=g)
    _refused_everywhere(lambda: fastkd.fused_linear_kd_loss(h, w[cols], teacher=teacher, labels=other,
                                                            vocab_shard=shard),
                        "different labels or sparse-teacher ids")
    # check=False: after its first call only N is checked, in one fixed-size collective -- a rank with
    # another N is an error on every rank, not a collective of mismatched sizes (a gloo abort, or a hang)
    quick = VocabShard(check=False)
    fastkd.kd_loss(s[:, cols], t[:, cols], vocab_shard=quick)
    _refused_everywhere(lambda: fastkd.kd_loss(s[:n, cols], t[:n, cols], vocab_shard=quick),
                        "different numbers of rows", "check=False")
    fastkd.kd_loss(s[:4, cols], t[:4, cols], vocab_shard=quick)  # the same N everywhere: fine again
    # a slice whose size disagrees with start/total
    wrong = VocabShard(start=cols.start, total=vocab + 1)
    _refused_everywhere(lambda: fastkd.kd_loss(s[:, cols], t[:, cols], vocab_shard=wrong), f"total={vocab + 1}")


def dtensor_cases(world):
    """Tensor parallelism with DTensors: the shard from the placement (torch.chunk's uneven split of
    V = 29), against the unsharded loss -- kd_loss with the teacher sharded alike or full,
    sparse_kd_loss, fused_linear_kd_loss with a ColwiseParallel head, kd_loss of that head's
    Shard(-1) logits; a replicated DTensor loss, gradients sharded like their inputs."""
    import fastkd
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    n, vocab, hid = 6, 29, 8
    s, t, labels = _data(n, vocab, torch.float64, seed=12)
    opts = dict(labels=labels, hard_weight=0.2, temperature=2.0)

    def check(got, want, x_grad, want_grad, what):
        if not (isinstance(got, DTensor) and tuple(got.placements) == (Replicate(),)):
            raise AssertionError(f"{what}: the loss is {type(got).__name__} {getattr(got, 'placements', '')}")
        _close(got.full_tensor(), want, what, 1e-12)
        _close(x_grad.full_tensor(), want_grad, what + " grad", 1e-12)

    x = s.clone().requires_grad_()
    want = fastkd.kd_loss(x, t, backend="torch", **opts)
    want.backward()
    for teacher in (distribute_tensor(t, mesh, [Shard(-1)]), t):
        d = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
        got = fastkd.kd_loss(d, teacher, **opts)
        got.backward()
        if tuple(d.grad.placements) != (Shard(1),):
            raise AssertionError(f"the gradient is placed {d.grad.placements}")
        check(got, want, d.grad, x.grad, f"dtensor kd_loss, teacher {type(teacher).__name__}")
    sparse = fastkd.topk_teacher(t, k=4, temperature=2.0)
    x = s.clone().requires_grad_()
    want = fastkd.sparse_kd_loss(x, sparse, labels=labels, backend="torch")
    want.backward()
    d = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_()
    got = fastkd.sparse_kd_loss(d, sparse, labels=labels)
    got.backward()
    check(got, want, d.grad, x.grad, "dtensor sparse_kd_loss")
    g = torch.Generator().manual_seed(13)
    h, th = torch.randn(n, hid, generator=g, dtype=torch.float64), torch.randn(n, hid, generator=g, dtype=torch.float64)
    tw = torch.randn(vocab, hid, generator=g, dtype=torch.float64)
    torch.manual_seed(14)  # (the same head on every rank: distribute_tensor takes rank 0's)
    head = torch.nn.Linear(hid, vocab).double()
    ref = torch.nn.Linear(hid, vocab).double()
    ref.load_state_dict(head.state_dict())
    parallelize_module(head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False))
    hr, hd = h.clone().requires_grad_(), h.clone().requires_grad_()
    want = fastkd.fused_linear_kd_loss(hr, ref.weight, student_bias=ref.bias, teacher_hidden=th, teacher_weight=tw,
                                       labels=labels, chunk_size=4, backend="torch")
    want.backward()
    got = fastkd.fused_linear_kd_loss(hd, head.weight, student_bias=head.bias, teacher_hidden=th, teacher_weight=tw,
                                      labels=labels, chunk_size=4)
    got.backward()
    check(got, want, head.weight.grad, ref.weight.grad, "dtensor fused_linear_kd_loss")
    _close(head.bias.grad.full_tensor(), ref.bias.grad, "dtensor fused bias grad", 1e-12)
    _close(hd.grad, hr.grad, "dtensor fused hidden grad", 1e-12)
    with torch.no_grad():
        got = fastkd.kd_loss(head(h), t, labels=labels)
        _close(got.full_tensor(), fastkd.kd_loss(ref(h), t, labels=labels, backend="torch"), "head(h) logits", 1e-12)
    # placements fastkd does not take, and a VocabShard beside a DTensor: refused on every rank alike
    rows = distribute_tensor(s, mesh, [Shard(0)])
    _refused_everywhere(lambda: fastkd.kd_loss(rows, t), "placed", "Shard(-1)")
    from fastkd.distributed import VocabShard
    d = distribute_tensor(s, mesh, [Shard(-1)])
    _refused_everywhere(lambda: fastkd.kd_loss(d, t, vocab_shard=VocabShard()), "from the DTensor")
    # a teacher that is wrong on one rank only (V + 1 columns; a head with an extra row): an error on
    # every rank, not the others left waiting in the agreement's all_gather (they hung until the timeout)
    wide = torch.cat([t, t[:, :1]], dim=-1) if dist.get_rank() == 1 else t
    _refused_everywhere(lambda: fastkd.kd_loss(d, wide), "rank 1", "teacher_logits")
    tall = torch.cat([tw, tw[:1]]) if dist.get_rank() == 1 else tw
    _refused_everywhere(lambda: fastkd.fused_linear_kd_loss(h, head.weight, student_bias=head.bias, teacher_hidden=th,
                                                            teacher_weight=tall, chunk_size=4),
                        "rank 1", "teacher_weight")


def comm_cases(shard, counted, cols, vocab):
    """The bytes each step sends: a few float64 per row, whatever the vocabulary."""
    import fastkd

    per_row = {}
    for vocab_scale in (1, 4):
        s, t, labels = _data(64, vocab * vocab_scale, torch.float32, seed=9)
        width = cols.stop - cols.start
        mine = slice(cols.start * vocab_scale, cols.start * vocab_scale + width * vocab_scale)
        counted.take()
        x = s[:, mine].clone().requires_grad_()
        fastkd.kd_loss(x, t[:, mine], divergence="jsd", labels=labels, hard_weight=0.1, vocab_shard=shard).backward()
        calls = counted.take()
        reduced = sum(b for name, b in calls if name == "all_reduce")
        header = sum(b for name, b in calls if name == "all_gather")
        per_row[vocab_scale] = reduced / 64
        if [name for name, _ in calls] != ["all_gather", "all_reduce", "all_reduce", "all_reduce"]:
            raise AssertionError(f"unexpected collectives {calls}")
        if header > 8 * 8:
            raise AssertionError(f"the agreement sent {header} bytes")
    if per_row[1] != per_row[4] or per_row[1] > 16 * 8:
        raise AssertionError(f"bytes per row {per_row} grow with the vocabulary or exceed 16 float64")
    return per_row[1]


def run_backend(rank, world, rendezvous, sizes, backend):
    """mp.spawn's entry for the partial forms of one backend (e.g. triton, in its interpreter on
    CPU tensors): the dense and sparse cases with the sharded calls on `backend`."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from fastkd.distributed import VocabShard

        start = sum(sizes[:rank])
        cols = slice(start, start + sizes[rank])
        dense_cases(VocabShard(), cols, sum(sizes), backend)
        sparse_cases(VocabShard(), cols, sum(sizes), backend)
    finally:
        dist.destroy_process_group()


def run(rank, world, rendezvous, sizes, report):
    """mp.spawn's entry: sizes[r] columns on rank r (uneven; 0 is allowed)."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        import fastkd  # noqa: F401
        from fastkd.distributed import VocabShard

        counted = Counted()
        vocab = sum(sizes)
        start = sum(sizes[:rank])
        cols = slice(start, start + sizes[rank])
        shard = VocabShard()
        dense_cases(shard, cols, vocab)
        sparse_cases(shard, cols, vocab)
        fused_cases(shard, cols, vocab)
        padded_cases(shard, cols, vocab)
        explicit_layout_cases(sizes, rank, cols, vocab)
        error_cases(shard, rank, cols, vocab)
        dtensor_cases(world)
        per_row = comm_cases(shard, counted, cols, vocab)
        with open(f"{report}.{rank}", "w") as f:
            f.write(f"{per_row}\n")
    finally:
        dist.destroy_process_group()
