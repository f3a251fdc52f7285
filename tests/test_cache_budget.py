"""Caches sized by a budget: ragged sampled rows (format version 2) that cost what they hold, draws
chosen for a unique-id budget (fastkd.draws_for_unique) with the gradient still unbiased through the
cache, version 1 caches still read, `python -m fastkd cache --unique / --budget-bytes`, and the
`python -m fastkd study cache --quick` smoke run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastkd
from fastkd.cache import CacheError, CacheWriter, TeacherCache, _bits, _store, budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "tests", "cache_teacher.py") + ":teacher"


def _peaked(n, vocab, seed=0, scale=4.0):
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _write(directory, rows, tokens=None, shard_tokens=1 << 16, step=None):
    n, k = rows.indices.shape
    step = step or n
    with CacheWriter(str(directory), vocab_size=rows.vocab, kind="sampled",
                     num_samples=k, temperature=rows.temperature, teacher="t", has_tokens=tokens is not None,
                     shard_tokens=shard_tokens) as w:
        for a in range(0, n, step):
            w.append(fastkd.SparseTeacher(rows.indices[a:a + step], rows.logprobs[a:a + step],
                                          rows.tail_logmass[a:a + step], rows.temperature, "sampled"),
                     None if tokens is None else tokens[a:a + step])
    return TeacherCache(str(directory))


class _Rows:
    """sample_teacher's rows with the vocabulary they came from."""

    def __init__(self, logits, draws, temperature=1.0, seed=0):
        self.vocab = logits.shape[-1]
        t = fastkd.sample_teacher(logits, num_samples=draws, temperature=temperature,
                                  generator=torch.Generator().manual_seed(seed))
        self.indices, self.logprobs, self.tail_logmass = t.indices, t.logprobs, t.tail_logmass
        self.temperature = t.temperature


def test_ragged_rows_round_trip_and_cost_what_they_hold(tmp_path):
    """60 draws from peaked rows keep ~16 unique ids: the cache stores those, not 60 padded slots."""
    logits = _peaked(700, 3000, scale=5.0)
    rows = _Rows(logits, 60)
    tokens = torch.randint(0, 3000, (700,))
    cache = _write(tmp_path, rows, tokens, shard_tokens=256, step=100)
    assert cache.manifest["format_version"] == 2
    got = cache[:]
    assert torch.equal(got.indices, rows.indices)
    torch.testing.assert_close(got.logprobs, rows.logprobs.float(), rtol=0, atol=1e-6)
    for a, b in [(0, 1), (255, 257), (300, 700), (699, 700), (5, 5)]:  # windows across shard edges
        assert torch.equal(cache.read(a, b).indices, rows.indices[a:b])
    unique = torch.isfinite(rows.logprobs).sum(-1).double().mean().item()
    assert unique < 20
    formula = budget.sampled_bytes(unique, 60, 3000)
    assert formula <= cache.bytes_per_token <= formula * 1.02 + 2  # + shard headers and packing pad
    padded = 60 * (_bits.width_for(3000) + _bits.width_for(61)) / 8
    assert cache.bytes_per_token < padded / 2
    assert sum(e["num_entries"] for e in cache.manifest["shards"]) == torch.isfinite(rows.logprobs).sum()


def test_topk_bytes_formula_matches_the_format(tmp_path):
    logits = _peaked(512, 1000).float()
    for k in (1, 8, 37, 38, 64):
        d = tmp_path / f"k{k}"
        with CacheWriter(str(d), vocab_size=1000, k=k, temperature=1.0, teacher="t") as w:
            w.append(fastkd.topk_teacher(logits, k=k, temperature=1.0), torch.randint(0, 1000, (512,)))
        got = TeacherCache(str(d)).bytes_per_token
        assert budget.topk_bytes(k, 1000) <= got <= budget.topk_bytes(k, 1000) + 1.5, (k, got)


def test_format_version_1_caches_still_read(tmp_path, monkeypatch):
    """A cache written by an earlier fastkd (sampled rows padded to num_samples) reads the same,
    and a resumed one stays version 1."""
    rows = _Rows(_peaked(90, 500), 12)
    monkeypatch.setattr(_store, "FORMAT_VERSION", 1)
    old = _write(tmp_path, rows, shard_tokens=40, step=30)
    monkeypatch.undo()
    assert old.manifest["format_version"] == 1 and "num_entries" not in old.manifest["shards"][0]
    fresh = TeacherCache(str(tmp_path))
    assert torch.equal(fresh[:].indices, rows.indices)
    with CacheWriter(str(tmp_path), vocab_size=500, kind="sampled", num_samples=12, temperature=1.0,
                     teacher="t", has_tokens=False, shard_tokens=40) as w:
        w.append(fastkd.SparseTeacher(rows.indices[:10], rows.logprobs[:10], rows.tail_logmass[:10], 1.0, "sampled"))
    again = TeacherCache(str(tmp_path))
    assert again.manifest["format_version"] == 1 and len(again) == 100
    assert torch.equal(again[90:100].indices, rows.indices[:10])


def _forge(directory, edit):
    """Rewrite shard 0 after edit(tensors) with a matching sha256 and manifest (a forged cache)."""
    m = _store.read_manifest(str(directory))
    entry = m["shards"][0]
    tensors = dict(_store.read_shard(str(directory), entry, m))
    edit(tensors, m)
    data = _store.shard_bytes({k: v.clone() for k, v in tensors.items()},
                              {"format": _store.FORMAT, "num_tokens": entry["num_tokens"], "first_token": 0})
    m["shards"][0] = dict(_store.write_shard(str(directory), entry["file"], data), num_tokens=entry["num_tokens"],
                          num_entries=entry["num_entries"])
    m.pop("checksum")
    _store.write_manifest(str(directory), m)


def test_forged_ragged_shards_are_refused(tmp_path):
    rows = _Rows(_peaked(50, 400), 30)

    def longer(t, m):  # a row claiming more entries than num_samples
        lengths = _bits.unpack(t["lengths"], m["count_bits"], 0, 50)
        excess, lengths[3] = 31 - int(lengths[3]), 31
        for j in range(4, 50):  # the later rows give the entries back: the total stays what the manifest says
            take = min(excess, int(lengths[j]))
            lengths[j] -= take
            excess -= take
        t["lengths"] = _bits.pack(lengths, m["count_bits"])

    def zero_count(t, m):  # a stored entry with count 0 (only padding has count 0)
        counts = _bits.unpack(t["counts"], m["count_bits"], 0, 1)
        t["counts"] = t["counts"].clone()
        t["counts"][0] &= 0xFF & ~((1 << m["count_bits"]) - 1)  # (count_bits <= 8: the first entry's bits)
        assert counts.item() > 0

    for i, (edit, match) in enumerate([(longer, "more than num_samples|run past"), (zero_count, "count 0|add up")]):
        d = tmp_path / str(i)
        _write(d, rows)
        _forge(d, edit)
        with pytest.raises(CacheError, match=match):
            TeacherCache(str(d))[:]
    d = tmp_path / "entries"
    _write(d, rows)
    m = _store.read_manifest(str(d))
    m["shards"][0]["num_entries"] += 1  # the manifest's entry count against the shard's arrays
    m.pop("checksum")
    _store.write_manifest(str(d), m)
    with pytest.raises(CacheError, match=r"rows hold \d+ entries, the manifest says"):
        TeacherCache(str(d))[:]


def test_expected_unique_matches_the_draws():
    logits = _peaked(400, 200, scale=2.0)
    for draws in (1, 7, 40):
        t = fastkd.sample_teacher(logits, num_samples=draws, temperature=1.5,
                                  generator=torch.Generator().manual_seed(1))
        seen = torch.isfinite(t.logprobs).sum(-1).double().mean().item()
        assert abs(fastkd.expected_unique(logits, draws, 1.5) - seen) < 0.05 * seen + 0.1, draws
    assert fastkd.expected_unique(logits, 1, 1.5) == pytest.approx(1.0)


def test_draws_for_unique_is_the_fewest_that_reach_it():
    logits = _peaked(64, 1000)
    for unique in (1, 4, 12.5, 32):
        d = fastkd.draws_for_unique(logits, unique, 1.0)
        assert fastkd.expected_unique(logits, d, 1.0) >= unique
        assert d == 1 or fastkd.expected_unique(logits, d - 1, 1.0) < unique
    one_hot = torch.full((4, 50), float("-inf"))
    one_hot[:, 3] = 0.0  # one id only: no number of draws gives 2 unique ids
    assert fastkd.draws_for_unique(one_hot, 2, 1.0, max_draws=100) == 100
    with pytest.raises(ValueError, match="unique must be a positive number"):
        fastkd.draws_for_unique(logits, 0, 1.0)
    with pytest.raises(ValueError, match=r"max_draws must be an int in \[1, 255\]"):
        fastkd.draws_for_unique(logits, 3, 1.0, max_draws=256)


def test_the_gradient_through_a_unique_budget_cache_is_unbiased(tmp_path):
    """Draws set for 6 unique ids, written ragged and read back: the mean sparse-KD gradient over
    many rows drawn from one teacher row is the dense forward-KL gradient (within 5 standard
    errors), as it is for rows straight from sample_teacher (tests/test_sparse.py)."""
    v, n = 40, 3000
    s = torch.randn(1, v, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.randn(1, v, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    draws = fastkd.draws_for_unique(t, 6, 2.0)
    assert draws > 6  # more draws than unique ids: what the budget buys
    rows = _Rows(t.expand(n, v), draws, temperature=2.0, seed=3)
    got = _write(tmp_path, rows, shard_tokens=700, step=500)[:]
    sl = s.expand(n, v).clone().requires_grad_(True)
    fastkd.sparse_kd_loss(sl, got, tail="renorm_teacher", reduction="sum").backward()
    sd = s.clone().requires_grad_(True)
    fastkd.kd_loss(sd, t, temperature=2.0, reduction="sum", backend="torch").backward()
    mean, se = sl.grad.mean(0), sl.grad.std(0) / n**0.5
    assert ((mean - sd.grad[0]).abs() <= 5 * se + 1e-6).all()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "fastkd", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_cli_unique_and_budget_bytes(tmp_path):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 1000, 256))
    common = ["--teacher", TEACHER, "--input", tmp_path / "ids.npy", "--temperature", 1.0, "--seq-len", 32,
              "--batch-size", 4, "--no-progress"]
    r = _cli("cache", *common, "--output", tmp_path / "u", "--unique", 10)
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from cache_teacher import teacher

    probe = teacher(torch.from_numpy(np.load(tmp_path / "ids.npy"))[:128].view(4, 32))
    cache = TeacherCache(str(tmp_path / "u"))
    assert cache.manifest["num_samples"] == fastkd.draws_for_unique(probe, 10, 1.0)
    assert f"{cache.manifest['num_samples']} draws a row" in r.stderr
    for b in (14, 40, 300):
        r = _cli("cache", *common, "--output", tmp_path / f"b{b}", "--budget-bytes", b)
        assert r.returncode == 0, r.stderr
        got = TeacherCache(str(tmp_path / f"b{b}"))
        assert got.bytes_per_token <= b * 1.1 + 2, (b, got.bytes_per_token, r.stderr)  # the first batch calibrates
        assert "chosen by" in r.stderr
    r = _cli("cache", *common, "--output", tmp_path / "tiny", "--budget-bytes", 1)
    assert r.returncode == 2 and "--budget-bytes: budget 1 bytes/token is below the smallest cache" in r.stderr
    r = _cli("cache", *common, "--output", tmp_path / "neg", "--unique", -3)
    assert r.returncode == 2 and "--unique must be a positive number" in r.stderr


def test_budget_choice_follows_the_frontier(monkeypatch):
    probe = _peaked(256, 8192, scale=3.0).float()
    monkeypatch.setattr(budget, "FRONTIER", {"topk": ((8, 3.0), (64, 2.0)), "sampled": ((4.0, 2.5), (12.0, 2.4))})
    pick = budget.choose(30, probe, 1.0)  # top-8 fits (3.0) as does sampled with > 4 unique (2.5)
    assert pick["kind"] == "sampled" and pick["bytes_per_token"] <= 30
    pick = budget.choose(160, probe, 1.0)  # top-64 fits: 2.0 beats sampled's 2.4
    assert pick["kind"] == "topk" and 64 <= pick["k"] and pick["bytes_per_token"] <= 160
    monkeypatch.setattr(budget, "FRONTIER", {"topk": ((8, 2.0),), "sampled": ((4.0, 2.5),)})
    assert budget.choose(30, probe, 1.0)["kind"] == "topk"
    pick = budget.choose(5, probe, 1.0)  # below every measured size
    assert pick["kind"] == "sampled" and "below every size" in pick["why"]


@pytest.mark.slow
def test_study_quick_smoke(tmp_path):
    """`python -m fastkd study cache --quick`: the whole path on a small corpus, every output."""
    r = _cli("study", "cache", "--quick", "--out", tmp_path / "s", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    points = json.load(open(tmp_path / "s" / "frontier.json"))
    names = {p["scheme"] for p in points}
    assert {"dense_kd", "hard_labels", "topk_bucket-8", "sampled-u4"} <= names
    for p in points:
        assert {"scheme", "bytes_per_token", "val_loss_mean", "val_loss_std", "seeds"} <= set(p)
        assert (p["bytes_per_token"] is None) == (p["scheme"] in ("dense_kd", "hard_labels"))
        assert len(p["seeds"]) == 2 and p["val_loss_std"] >= 0 and np.isfinite(p["val_loss_mean"])
    u4 = next(p for p in points if p["scheme"] == "sampled-u4")
    assert u4["draws"] >= 4 and u4["unique_mean"] >= 3
    assert os.path.getsize(tmp_path / "s" / "frontier.png") > 10_000
    assert "| scheme | bytes/token |" in r.stdout
