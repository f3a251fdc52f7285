"""The teacher cache on the CPU: compressing teacher logits (topk_teacher / sample_teacher, cpu
backend vs the torch backend and vs naive PyTorch), the cache's size, and decoding from it.

Issue 3's targets: top-64 at <= 200 bytes/token and sampled-12 at <= 40 (V = 32000), and a batch
of 8192 tokens of top-64 decoded in well under 10 ms on one core. Sizes and compression ratios
(against bf16 logits, 2 V bytes/token) are attached to each result as extra_info and printed.
"""
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.cache import CacheWriter, TeacherCache

N, V, T = 4096, 32000, 2.0
DECODE = 8192


def naive_topk(t, k):
    """What a cache writer usually runs: log_softmax of the whole row, then topk."""
    lp = F.log_softmax(t.float() / T, -1)
    vals, ids = lp.topk(k, -1)
    return ids, vals, torch.log1p(-vals.exp().sum(-1).clamp(max=1))  # tail as 1 - sum: underflows


@pytest.fixture(scope="module")
def teacher_logits():
    return torch.randn(N, V, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("impl", ["topk64_cpu", "topk64_torch", "topk64_naive", "sampled12_cpu", "sampled12_torch"])
def test_compress(benchmark, teacher_logits, impl):
    fns = {
        "topk64_cpu": lambda: fastkd.topk_teacher(teacher_logits, k=64, temperature=T, backend="cpu"),
        "topk64_torch": lambda: fastkd.topk_teacher(teacher_logits, k=64, temperature=T, backend="torch"),
        "topk64_naive": lambda: naive_topk(teacher_logits, 64),
        "sampled12_cpu": lambda: fastkd.sample_teacher(teacher_logits, 12, T, backend="cpu"),
        "sampled12_torch": lambda: fastkd.sample_teacher(teacher_logits, 12, T, backend="torch"),
    }
    benchmark.group = f"compress {N}x{V} fp32 teacher rows"
    fns[impl]()
    benchmark.pedantic(fns[impl], rounds=3, iterations=1)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher_logits):
    """A top-64 and a sampled-12 cache of 2 * N = 8192 tokens (each row twice)."""
    out = {}
    tokens = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    for name, make, kw in [("top64", lambda: fastkd.topk_teacher(teacher_logits, k=64, temperature=T), {"k": 64}),
                           ("sampled12", lambda: fastkd.sample_teacher(teacher_logits, 12, T),
                            {"kind": "sampled", "num_samples": 12})]:
        path = str(tmp_path_factory.mktemp(name))
        rows = make()
        with CacheWriter(path, vocab_size=V, temperature=T, teacher="bench", **kw) as w:
            w.append(rows, tokens)
            w.append(rows, tokens)
        out[name] = TeacherCache(path)
    return out


@pytest.mark.parametrize("name", ["top64", "sampled12"])
def test_decode_8192_tokens_one_core(benchmark, caches, name):
    cache = caches[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cache.read(0, DECODE)  # maps and verifies the shard once
        benchmark.group = f"decode {DECODE} tokens, 1 thread"
        benchmark.extra_info.update(bytes_per_token=round(cache.bytes_per_token, 2),
                                    ratio_vs_bf16_logits=round(2 * V / cache.bytes_per_token, 1))
        print(f"\n{name}: {cache.bytes_per_token:.2f} bytes/token (tokens and headers included), "
              f"{2 * V / cache.bytes_per_token:.0f}x smaller than bf16 logits")
        benchmark.pedantic(lambda: cache.read(0, DECODE), rounds=20, iterations=1)
    finally:
        torch.set_num_threads(threads)
