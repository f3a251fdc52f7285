"""One table of sample inputs per op (the pytorch/extension-cpp way): each entry is a name and the
op's positional arguments, on CPU tensors. tests/test_dispatch.py runs every op of
fastkd/backends.py's table on every available backend against backend "torch" with them."""
import torch

from conftest import logits

NEG_INF = float("-inf")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _labels(n, vocab, seed=3):
    lab = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))
    lab[::3] = -100
    return lab


def _masked(x):
    """Shared -inf columns, one row fully masked, one row masked but for two ids."""
    x = x.clone()
    x[:, 3:9] = NEG_INF
    x[1] = NEG_INF
    x[2, 11:] = NEG_INF
    return x


def dense_kd(dtype=torch.float32):
    n, v = 6, 333  # not a multiple of any vector width or block
    s, t = logits((n, v), dtype), logits((n, v), dtype, seed=1)
    out = []
    for div in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"):
        out.append((f"{div}", (s, t, None, div, 2.0, 0.3, -100, 0.0, True, 1.0, True)))
        out.append((f"{div}-labels-hard", (s, t, _labels(n, v), div, 1.5, 0.6, -100, 0.25, False, 0.5, True)))
    sm, tm = _masked(s), _masked(t)
    out.append(("forward_kl-masked", (sm, tm, None, "forward_kl", 1.0, 0.5, -100, 0.0, True, 1.0, True)))
    out.append(("jsd-masked", (sm, tm, None, "jsd", 2.0, 0.5, -100, 0.0, True, 1.0, True)))
    out.append(("forward_kl-no-grad", (s, t, _labels(n, v), "forward_kl", 2.0, 0.5, -100, 0.1, True, 1.0, False)))
    big = logits((4, 64), dtype, scale=1e4)
    out.append(("reverse_kl-1e4", (big, logits((4, 64), dtype, scale=1e4, seed=1), None, "reverse_kl", 1.0, 0.5, -100,
                                   0.0, True, 1.0, True)))
    out.append(("empty", (s[:0], t[:0], None, "forward_kl", 1.0, 0.5, -100, 0.0, True, 1.0, True)))
    return out


def _topk(t, k, temperature=2.0):
    from fastkd.reference.topk_teacher import topk_teacher

    return topk_teacher(t.float(), k, temperature)


def sparse_kd(dtype=torch.float32):
    n, v = 6, 333
    s = logits((n, v), dtype)
    t = logits((n, v), torch.float32, seed=1)
    idx, lp, tail = _topk(t, 17)
    sampled = torch.tensor([[4, 9, 0, 0]] * n), torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]] * n)), torch.full((n,),
                                                                                                                NEG_INF)
    out = []
    for tail_mode in ("bucket", "renorm_teacher", "renorm_both"):
        out.append((tail_mode, (s, idx, lp, tail, None, tail_mode, 2.0, -100, 0.0, True, 1.0, True)))
        out.append((f"{tail_mode}-labels-hard", (s, idx, lp, tail, _labels(n, v), tail_mode, 2.0, -100, 0.3, False,
                                                 0.25, True)))
        # a padding entry (logprob -inf) whose id repeats a real one, as sample_teacher pads with id 0
        out.append((f"{tail_mode}-padding-id-repeats", (s, *sampled, None, tail_mode, 2.0, -100, 0.0, True, 1.0, True)))
    ids = torch.arange(17).expand(n, 17).contiguous()
    on_i = torch.full((n, v), -300.0)  # the student's mass outside I lies ~1e-130 below its maximum
    on_i[:, :17] = logits((n, 17), torch.float32, seed=4)
    off_i = on_i.clone()  # ... and here its mass on I does
    off_i[:, :17] -= 300.0
    off_i[:, 200] = 0.0
    out.append(("bucket-tail-far-below-max", (on_i.to(dtype), ids, lp, tail, None, "bucket", 1.0, -100, 0.0, True, 1.0,
                                              True)))
    out.append(("renorm_both-far-below-max", (off_i.to(dtype), ids, lp, tail, None, "renorm_both", 1.0, -100, 0.0,
                                              True, 1.0, True)))
    empty = torch.full_like(lp, NEG_INF)
    out.append(("no-teacher-entries", (s, idx, empty, torch.full((n,), NEG_INF), None, "renorm_teacher", 2.0, -100,
                                       0.0, True, 1.0, True)))
    out.append(("no-grad", (s, idx, lp, tail, None, "bucket", 2.0, -100, 0.0, True, 1.0, False)))
    return out


def topk_teacher(dtype=torch.float32):
    t = logits((7, 333), torch.float32, scale=6.0).to(dtype)
    tm = _masked(t)
    return [("k17", (t, 17, 1.5)), ("k1", (t, 1, 1.0)), ("k64", (t, 64, 2.0)), ("k-all", (t[:, :40], 40, 2.0)),
            ("masked", (tm, 8, 2.0))]


def sample_teacher_draws(dtype=torch.float32):
    t = logits((7, 333), torch.float32, scale=3.0).to(dtype)
    g = torch.Generator().manual_seed(5)
    u = torch.rand(7, 12, dtype=torch.float64, generator=g).sort(-1).values
    return [("s12", (t, u, 2.0)), ("masked", (_masked(t), u, 1.0)), ("one", (t, u[:, :1].contiguous(), 2.0))]


def unpack_bits(dtype=None):
    from fastkd.cache import _bits

    values = torch.randint(0, 1 << 17, (203,), generator=torch.Generator().manual_seed(1))
    stream = _bits.pack(values, 17)
    return [("w17", (stream, 17, 5, 190)), ("w17-empty", (stream, 17, 9, 9))]


def unpack_monotone(dtype=None):
    from fastkd.cache import _bits

    values = torch.randint(0, 255, (5, 63), generator=torch.Generator().manual_seed(2)).sort(-1).values
    return [("count63", (_bits.pack_monotone(values, 255), 63))]


def _slice_labels(n):
    return torch.tensor([3, -1, -2, 39, 0, 7][:n])  # -1: ignored, -2: another slice's (the layer's codes)


def dense_kd_stats(dtype=torch.float32):
    s, t = logits((6, 40), dtype), logits((6, 40), dtype, seed=1)
    close = (s.double() + 0.05 * logits((6, 40), torch.float64, seed=2)).to(dtype)  # |t - s| < 1: r is used
    return [("hard", (s, t, 2.0, True)), ("masked", (_masked(s), _masked(t), 1.0, False)),
            ("empty-slice", (s[:, :0], t[:, :0], 1.0, True)), ("close-hard-t1", (s, close, 1.0, True))]


def _dense_row(s, t, temperature):
    """DENSE_ROW of rows whose slice s, t is the whole vocabulary (forward KL's u = -1)."""
    a, b = s.double() / temperature, t.double() / temperature
    m_a, m_b, m_1 = a.amax(-1), b.amax(-1), s.double().amax(-1)
    ls = lambda x, m: (x - m.unsqueeze(-1)).exp().sum(-1).log()  # noqa: E731
    dl = (m_b + ls(b, m_b)) - (m_a + ls(a, m_a))
    return torch.stack([m_a, ls(a, m_a), m_b, ls(b, m_b), dl, m_1, ls(s.double(), m_1), -torch.ones_like(dl)], -1)


def dense_kd_shard(dtype=torch.float32):
    s, t = logits((6, 40), dtype), logits((6, 40), dtype, seed=1)
    row = _dense_row(s, t, 2.0)
    return [("jsd-hard", (s, t, _slice_labels(6), row, "jsd", 2.0, 0.5, -1, 0.2, True, 0.5, True)),
            ("forward_kl", (s, t, None, row, "forward_kl", 2.0, 0.5, -1, 0.0, True, 1.0, True)),
            ("no-grad", (s, t, None, row, "tvd", 2.0, 0.5, -1, 0.0, True, 1.0, False))]


def dense_kd_finish(dtype=torch.float32):
    s, t = logits((6, 40), dtype), logits((6, 40), dtype, seed=1)
    row = _dense_row(s, t, 2.0)
    row[:, -1] = torch.tensor([0.3, -0.2, 0.0, 1.5, 2.0, -0.7], dtype=torch.float64)  # the rows' U
    row[2, 2] = float("-inf")  # a row without a teacher distribution: left as it is
    grad = logits((6, 40), torch.float32 if dtype == torch.float16 else dtype, seed=2) * 0.01
    masked = row.clone()  # (an infinite U makes its row NaN: opcheck cannot compare NaN outputs; the
    masked[1] = float("nan")  # distributed suite covers it) a row that read a NaN on some rank: left as it is
    return [("jsd", (grad, s, row, 2.0, 0.7)), ("masked", (grad, s, masked, 1.0, 0.5))]


def _sparse_slice_teacher(n):
    idx = torch.tensor([[0, 7, 50, -3]] * n)  # 50 and -3 lie in other slices
    return idx, torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * n))


def sparse_kd_stats(dtype=torch.float32):
    s = logits((6, 40), dtype)
    return [("hard", (s, *_sparse_slice_teacher(6), 2.0, True)), ("plain", (s, *_sparse_slice_teacher(6), 1.0, False))]


def sparse_kd_shard(dtype=torch.float32):
    s = logits((6, 40), dtype)
    row = torch.tensor([[0.0, 1.0, 5.0, 1.0, 5.0, 0.0, 4.0, 5.0]] * 6, dtype=torch.float64)
    return [("hard", (s, *_sparse_slice_teacher(6), _slice_labels(6), row, 2.0, -1, 0.2, True, 1.0)),
            ("plain", (s, *_sparse_slice_teacher(6), None, row, 2.0, -1, 0.0, True, 0.5))]


SAMPLES = {"dense_kd": dense_kd, "sparse_kd": sparse_kd, "topk_teacher": topk_teacher,
           "sample_teacher_draws": sample_teacher_draws, "unpack_bits": unpack_bits,
           "unpack_monotone": unpack_monotone, "dense_kd_stats": dense_kd_stats, "dense_kd_shard": dense_kd_shard,
           "dense_kd_finish": dense_kd_finish,
           "sparse_kd_stats": sparse_kd_stats, "sparse_kd_shard": sparse_kd_shard}
PARTIAL_OPS = ("dense_kd_stats", "dense_kd_shard", "dense_kd_finish", "sparse_kd_stats", "sparse_kd_shard")
FLOAT_OPS = ("dense_kd", "sparse_kd", "topk_teacher", "sample_teacher_draws") + PARTIAL_OPS
