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
    out.append(("reverse_kl-1e4", (big, logits((4, 64), dtype, scale=1e4, seed=1), None, "reverse_kl", 1.0, 0.5, -100, 0.0, True, 1.0, True)))
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
    sampled = torch.tensor([[4, 9, 0, 0]] * n), torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0]] * n)), torch.full((n,), NEG_INF)
    out = []
    for tail_mode in ("bucket", "renorm_teacher", "renorm_both"):
        out.append((tail_mode, (s, idx, lp, tail, None, tail_mode, 2.0, -100, 0.0, True, 1.0, True)))
        out.append((f"{tail_mode}-labels-hard", (s, idx, lp, tail, _labels(n, v), tail_mode, 2.0, -100, 0.3, False, 0.25, True)))
        # a padding entry (logprob -inf) whose id repeats a real one, as sample_teacher pads with id 0
        out.append((f"{tail_mode}-padding-id-repeats", (s, *sampled, None, tail_mode, 2.0, -100, 0.0, True, 1.0, True)))
    ids = torch.arange(17).expand(n, 17).contiguous()
    on_i = torch.full((n, v), -300.0)  # the student's mass outside I lies ~1e-130 below its maximum
    on_i[:, :17] = logits((n, 17), torch.float32, seed=4)
    off_i = on_i.clone()  # ... and here its mass on I does
    off_i[:, :17] -= 300.0
    off_i[:, 200] = 0.0
    out.append(("bucket-tail-far-below-max", (on_i.to(dtype), ids, lp, tail, None, "bucket", 1.0, -100, 0.0, True, 1.0, True)))
    out.append(("renorm_both-far-below-max", (off_i.to(dtype), ids, lp, tail, None, "renorm_both", 1.0, -100, 0.0, True, 1.0, True)))
    empty = torch.full_like(lp, NEG_INF)
    out.append(("no-teacher-entries", (s, idx, empty, torch.full((n,), NEG_INF), None, "renorm_teacher", 2.0, -100, 0.0, True, 1.0, True)))
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


SAMPLES = {"dense_kd": dense_kd, "sparse_kd": sparse_kd, "topk_teacher": topk_teacher,
           "sample_teacher_draws": sample_teacher_draws, "unpack_bits": unpack_bits,
           "unpack_monotone": unpack_monotone}
FLOAT_OPS = ("dense_kd", "sparse_kd", "topk_teacher", "sample_teacher_draws")
