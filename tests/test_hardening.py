"""A teacher cache from anywhere cannot crash, hang, escape or lie; raw ops check what they trust
(docs/cache-format.md, "Threat model"). Each test reproduces a way the reader, the writer, the
CLI or a compiled op could be made to crash, hang, read outside the cache, or serve garbage."""
import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkd
from fastkd import backends
from fastkd.cache import CacheError, CacheWriter, TeacherCache
from fastkd.cache import _bits, _store
from conftest import device_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHERS = os.path.join(ROOT, "tests", "cache_teacher.py")
OPS = fastkd.backends.available_for("cpu", interpreted=False)


def _cache(directory, n=40, vocab=100, k=6, shard_tokens=20, kind="topk"):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=g)
    tokens = torch.randint(0, vocab, (n,), generator=g)
    if kind == "topk":
        rows, opts = fastkd.topk_teacher(logits, k=k, temperature=2.0), dict(k=k)
    else:
        rows, opts = fastkd.sample_teacher(logits, k, 2.0, generator=g), dict(kind="sampled", num_samples=k)
    with CacheWriter(str(directory), vocab_size=vocab, temperature=2.0, teacher="t", shard_tokens=shard_tokens,
                     **opts) as w:
        for a in range(0, n, 10):
            w.append(fastkd.SparseTeacher(*(f[a:a + 10] for f in rows[:3]), rows.temperature, rows.kind),
                     tokens[a:a + 10])
    return directory


def _edit_manifest(directory, change):
    path = os.path.join(directory, "manifest.json")
    m = json.loads(open(path).read())
    change(m)
    _store.write_manifest(str(directory), {key: v for key, v in m.items() if key != "checksum"})


def _read_everything(directory):
    cache = TeacherCache(str(directory))
    cache.read(0, len(cache))
    if cache.manifest["has_tokens"]:
        cache.tokens(0, len(cache))
    cache.verify_all()


# --- the reader ------------------------------------------------------------------------------

FIELDS = ["kind", "k", "num_samples", "vocab_size", "temperature", "teacher", "seq_len", "id_bits",
          "count_bits", "has_tokens", "num_tokens", "shards", "logprob_quantisation"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.sampled_from([0, 1, 2**58, -1, 2**24 + 1]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                   st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2))


@settings(max_examples=int(os.environ.get("FASTKD_HYPOTHESIS_EXAMPLES", 60)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS + ["shards.file", "shards.bytes", "shards.num_tokens", "shards.sha256"]),
       value=VALUES, kind=st.sampled_from(["topk", "sampled"]))
def test_any_forged_manifest_field_is_a_cache_error(tmp_path_factory, field, value, kind):
    """Every manifest field, set to any JSON value and re-checksummed as a forger would: the reader
    raises CacheError (naming the field) or serves the genuine rows -- never another exception,
    a crash or a hang."""
    directory = _cache(tmp_path_factory.mktemp("c"), kind=kind)
    want = TeacherCache(str(directory)).read(0, 40)

    def change(m):
        if field.startswith("shards."):
            m["shards"][0][field.split(".")[1]] = value
        else:
            m[field] = value

    _edit_manifest(directory, change)
    try:
        cache = TeacherCache(str(directory))
        got = cache.read(0, len(cache))
    except CacheError:
        return
    assert torch.equal(got.indices, want.indices) and torch.equal(got.logprobs, want.logprobs)


def test_a_huge_shard_token_count_is_refused_not_a_segfault(tmp_path):
    """num_tokens of 2^58 once overflowed an index in fastkd::unpack_bits, whose bounds check then
    passed, and the process died with SIGSEGV."""
    directory = _cache(tmp_path)

    def change(m):
        m["shards"][0]["num_tokens"] = 2**58
        m["num_tokens"] = 2**58 + 20

    _edit_manifest(directory, change)
    with pytest.raises(CacheError, match="num_tokens"):
        _read_everything(directory)


@pytest.mark.parametrize("name", ["../shard-00000.safetensors", "/etc/passwd", "sub/shard-00000.safetensors",
                                  "shard-00000.safetensors/..", "manifest.json"])
def test_shard_names_stay_inside_the_cache(tmp_path, name):
    directory = _cache(tmp_path)
    _edit_manifest(directory, lambda m: m["shards"][0].update(file=name))
    with pytest.raises(CacheError, match="file|shard name"):
        _read_everything(directory)


def test_a_symlink_leaving_the_cache_or_a_fifo_is_refused(tmp_path):
    directory = _cache(tmp_path / "c")
    outside = tmp_path / "outside.safetensors"
    os.replace(directory / "shard-00000.safetensors", outside)
    os.symlink(outside, directory / "shard-00000.safetensors")
    with pytest.raises(CacheError, match="leaves the cache directory"):
        _read_everything(directory)
    os.remove(directory / "shard-00000.safetensors")
    os.mkfifo(directory / "shard-00000.safetensors")  # opening a FIFO for reading blocked forever
    with pytest.raises(CacheError, match="not a regular file"):
        _read_everything(directory)


def _rewrite_shard(directory, entry_index, edit_header):
    """Rewrite a shard's safetensors header with `edit_header`, then fix its sha256, size and the
    manifest's checksum: a forgery the checksums cannot catch."""
    path = os.path.join(directory, f"shard-{entry_index:05d}.safetensors")
    data = open(path, "rb").read()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    new = struct.pack("<Q", len(text)) + text + data[8 + n:]
    open(path, "wb").write(new)
    _edit_manifest(directory, lambda m: m["shards"][entry_index].update(
        bytes=len(new), sha256=hashlib.sha256(new).hexdigest()))


def test_shard_header_offsets_must_match_the_layout(tmp_path):
    """A header that points `ids` at the `codes` bytes decoded ids beyond V."""
    directory = _cache(tmp_path)

    def point_ids_at_codes(h):
        ids_bytes = h["ids"]["data_offsets"][1] - h["ids"]["data_offsets"][0]
        h["ids"]["data_offsets"] = h["codes"]["data_offsets"][:1] + [h["codes"]["data_offsets"][0] + ids_bytes]

    _rewrite_shard(directory, 0, point_ids_at_codes)
    with pytest.raises(CacheError, match="data_offsets"):
        _read_everything(directory)


def test_forged_values_are_refused_when_decoded(tmp_path):
    """A well-formed shard whose packed ids exceed V (w bits hold up to 2^w - 1 >= V)."""
    directory = _cache(tmp_path, vocab=100)
    path = directory / "shard-00000.safetensors"
    data = bytearray(open(path, "rb").read())
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + n])
    start = 8 + n + header["ids"]["data_offsets"][0]
    data[start:start + 2] = b"\xff\xff"  # id 0 becomes 127 > V = 100
    open(path, "wb").write(data)
    _edit_manifest(directory, lambda m: m["shards"][0].update(sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(CacheError, match="beyond vocab_size=100"):
        TeacherCache(str(directory)).read(0, 20)


def test_a_shard_changed_after_it_was_read_cannot_crash_the_reader(tmp_path):
    """Shards are read into memory, not mapped: truncating one under the reader (rsync --inplace,
    a full disk) killed it with SIGBUS. Now it keeps serving the bytes it verified, and a later
    read of the truncated file is a CacheError."""
    directory = _cache(tmp_path)
    cache = TeacherCache(str(directory), max_shards=1)
    want = cache.read(0, 20)
    with open(directory / "shard-00000.safetensors", "r+b") as f:
        f.truncate(100)
    assert torch.equal(cache.read(0, 20).indices, want.indices)  # still the verified bytes
    cache.read(20, 40)  # shard 1 evicts shard 0
    with pytest.raises(CacheError, match="truncated or replaced"):
        cache.read(0, 20)


# --- the compiled ops, called directly --------------------------------------------------------

def _op(op, backend):
    return backends.kernel(op, backend, torch.device("cpu"))


@pytest.mark.parametrize("backend", OPS)
def test_unpack_bits_bounds_cannot_overflow(backend):
    stream = _bits.pack(torch.arange(16), 5)
    with pytest.raises(ValueError, match="lie outside a stream"):
        _op("unpack_bits", backend)(stream, 5, 0, 2**58)
    with pytest.raises(ValueError, match="lie outside a stream"):
        _op("unpack_bits", backend)(stream, 5, 2**61, 2**61 + 3)


@pytest.mark.parametrize("backend", OPS)
def test_a_bitmap_with_more_ones_than_count_is_refused(backend):
    bitmap = _bits.pack_monotone(torch.tensor([[0, 1, 3]]), 10)
    bitmap[0, -1] |= 0x80  # a fourth value
    with pytest.raises(ValueError, match="holds 4 values, expected 3"):
        _op("unpack_monotone", backend)(bitmap, 3)


def _sparse_args(indices, logprobs, tail=None, k=None):
    s = torch.randn(2, 10)
    tail = torch.full((2,), -1.0) if tail is None else tail
    return (s, indices, logprobs, tail, None, "bucket", 1.0, -100, 0.0, True, 1.0, False)


@pytest.mark.parametrize("backend", OPS)
def test_sparse_op_checks_its_teacher(backend):
    op = _op("sparse_kd", backend)
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1]] * 2))
    with pytest.raises(ValueError, match="duplicate id 1"):  # the C++ op once double-counted it
        op(*_sparse_args(torch.tensor([[0, 1, 1], [0, 1, 2]]), lp))
    with pytest.raises(ValueError, match="k >= 1"):
        op(*_sparse_args(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0)))
    with pytest.raises(ValueError, match="log-probabilities"):
        op(*_sparse_args(torch.tensor([[0, 1, 2]] * 2), lp + 5.0))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        op(*_sparse_args(torch.tensor([[0, 1, 10]] * 2), lp))


@pytest.mark.parametrize("backend", OPS)
def test_dense_op_checks_its_arguments(backend):
    op = _op("dense_kd", backend)
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    args = lambda **kw: {**dict(student=s, teacher=t, labels=None, divergence="jsd", temperature=1.0, beta=0.5,  # noqa: E731
                                ignore_index=-100, hard_weight=0.0, scale_by_t2=True, grad_scale=1.0,
                                compute_grad=False), **kw}.values()
    with pytest.raises(ValueError):
        op(*args(teacher=torch.randn(1, 8)))  # the torch twin broadcast it
    with pytest.raises(ValueError, match="temperature"):
        op(*args(temperature=-1.0))
    with pytest.raises(ValueError, match="hard_weight"):
        op(*args(hard_weight=2.0, labels=torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError, match="beta"):
        op(*args(beta=1.5))
    with pytest.raises(ValueError, match="beta"):
        op(*args(divergence="skew_forward_kl", beta=-0.5))


@pytest.mark.parametrize("backend", OPS)
def test_draws_op_checks_its_uniforms(backend):
    op = _op("sample_teacher_draws", backend)
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="ascend"):
        op(logits, torch.tensor([[0.5, 0.1], [0.1, 0.2]], dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        op(logits, torch.tensor([[0.1, 1.5], [0.1, 0.2]], dtype=torch.float64), 1.0)


def test_bench_refuses_unknown_implementations():
    r = subprocess.run([sys.executable, "-m", "fastkd", "bench", "--impls", "bogus", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "--impls: unknown bogus" in r.stderr and "Traceback" not in r.stderr


# --- teacher rows that are not numbers --------------------------------------------------------

@pytest.mark.parametrize("backend", fastkd.backends.available_for("cpu"))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_teacher_rows_with_nan_or_inf_are_nan(backend, bad):
    """sample_teacher made a NaN row a confident one-hot (cpu) or an empty row (torch); topk gave
    NaN (cpu) or positive log-probs (torch) for +inf. Now such a row is NaN, on every backend."""
    t = torch.randn(3, 30, device=device_of(backend))
    t[1, 4] = bad
    for teacher in (fastkd.topk_teacher(t, k=4, backend=backend), fastkd.sample_teacher(t, 6, backend=backend)):
        assert teacher.logprobs[1].isnan().any() and not teacher.logprobs[[0, 2]].isnan().any()
        loss = fastkd.sparse_kd_loss(torch.randn(3, 30, device=t.device), teacher, reduction="none")
        assert loss[1].isnan() and torch.isfinite(loss[[0, 2]]).all()


def test_the_writer_refuses_nan_rows_naming_the_position(tmp_path):
    t = torch.randn(8, 30)
    t[5, 2] = float("nan")
    with CacheWriter(str(tmp_path), vocab_size=30, k=4, temperature=1.0, teacher="t", has_tokens=False) as w:
        w.append(fastkd.topk_teacher(t[:3], k=4, temperature=1.0))
        with pytest.raises(ValueError, match=r"row 2 of this batch \(cache token 5\) is NaN"):
            w.append(fastkd.topk_teacher(t[3:], k=4, temperature=1.0))


def test_raw_logits_are_not_a_sparse_teacher():
    """A SparseTeacher holding logits instead of log-probs gave a loss of millions."""
    t = torch.randn(4, 30) * 5
    ids = t.topk(5).indices
    fake = fastkd.SparseTeacher(ids, t.gather(-1, ids), torch.zeros(4), 1.0, "topk")
    with pytest.raises(ValueError, match="log-probabilities"):
        fastkd.sparse_kd_loss(torch.randn(4, 30), fake)


# --- the writer and the CLI ---------------------------------------------------------------------

def test_a_failed_flush_never_shifts_the_cache(tmp_path, monkeypatch):
    """ENOSPC during a flush dropped the buffered rows; a caller who freed space and went on got a
    cache whose token i was no longer input token i."""
    logits = torch.randn(60, 40)
    tokens = torch.arange(60) % 40
    real = _store.write_shard
    calls = {"n": 0}

    def full_disk(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(_store, "write_shard", full_disk)
    w = CacheWriter(str(tmp_path), vocab_size=40, k=4, temperature=1.0, teacher="t", shard_tokens=20)
    rows = fastkd.topk_teacher(logits, k=4, temperature=1.0)
    part = lambda a, b: fastkd.SparseTeacher(*(f[a:b] for f in rows[:3]), 1.0, "topk")  # noqa: E731
    w.append(part(0, 20), tokens[0:20])
    with pytest.raises(OSError):
        w.append(part(20, 40), tokens[20:40])
    with pytest.raises(CacheError, match="writing a shard failed"):
        w.append(part(40, 60), tokens[40:60])  # going on would shift every later token
    w.close()  # retries the same rows
    cache = TeacherCache(str(tmp_path))
    assert len(cache) == 40 and torch.equal(cache.tokens(0, 40), tokens[:40])
    assert torch.equal(cache.read(20, 40).indices, TeacherCache(str(tmp_path)).read(20, 40).indices)


def test_a_lost_manifest_does_not_let_a_writer_overwrite_shards(tmp_path):
    directory = _cache(tmp_path)
    os.remove(directory / "manifest.json")
    with pytest.raises(CacheError, match="holds shard files .* but no manifest.json"):
        CacheWriter(str(directory), vocab_size=100, k=6, temperature=2.0, teacher="t")


def test_the_writer_locks_the_directory_and_removes_only_its_own_tmp_files(tmp_path):
    (tmp_path / "notes.tmp").write_text("mine, not fastkd's")
    (tmp_path / "shard-00003.safetensors.tmp").write_bytes(b"half a shard")
    w = CacheWriter(str(tmp_path), vocab_size=50, k=4, temperature=1.0, teacher="t", has_tokens=False)
    assert (tmp_path / "notes.tmp").exists() and not (tmp_path / "shard-00003.safetensors.tmp").exists()
    for name in os.listdir(tmp_path):  # nothing to delete that would let a second writer in
        assert name in ("notes.tmp", "manifest.json")
    with pytest.raises(CacheError, match="being written by another CacheWriter"):
        CacheWriter(str(tmp_path), vocab_size=50, k=4, temperature=1.0, teacher="t", has_tokens=False)
    w.close()
    with pytest.raises(CacheError, match="other settings"):
        CacheWriter(str(tmp_path), vocab_size=51, k=4, temperature=1.0, teacher="t", has_tokens=False)
    assert (tmp_path / "notes.tmp").exists()


def _cli(*args):
    cmd = [sys.executable, "-m", "fastkd", "cache", "--no-progress", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)


def _clean_failure(r, needle):
    assert r.returncode not in (0, 130) and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_cli_refuses_to_mix_two_corpora(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 1000, 200))
    np.save(tmp_path / "b.npy", rng.integers(0, 1000, 200))
    np.save(tmp_path / "short.npy", np.load(tmp_path / "a.npy")[:50])
    common = ["--teacher", f"{TEACHERS}:teacher", "--output", tmp_path / "c", "--k", 4, "--temperature", 1.0,
              "--seq-len", 20, "--shard-tokens", 40]
    assert _cli("--input", tmp_path / "a.npy", *common).returncode == 0
    before = sorted(os.listdir(tmp_path / "c"))
    _clean_failure(_cli("--input", tmp_path / "b.npy", *common), "written from another input")
    _clean_failure(_cli("--input", tmp_path / "short.npy", *common), "already holds 200 tokens but --input has 50")
    assert sorted(os.listdir(tmp_path / "c")) == before


@pytest.mark.slow
def test_cli_stops_on_a_nan_teacher_or_a_changing_vocabulary(tmp_path):
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 1000, 100))
    common = ["--input", tmp_path / "ids.npy", "--k", 4, "--temperature", 1.0, "--seq-len", 10, "--batch-size", 1]
    r = _cli("--teacher", f"{TEACHERS}:nan_teacher", "--output", tmp_path / "n", *common)
    _clean_failure(r, "is NaN")
    r = _cli("--teacher", f"{TEACHERS}:shrinking_teacher", "--output", tmp_path / "s", *common)
    _clean_failure(r, "vocabulary changed from V = 1000 to V = 999")


@pytest.mark.slow
def test_cli_bad_inputs_are_one_line_messages(tmp_path):
    np.save(tmp_path / "ok.npy", np.array([1, 2, 3]))
    (tmp_path / "bad.txt").write_bytes(b"1 2 \xff\xfe 3")
    (tmp_path / "afile").write_text("x")
    t = f"{TEACHERS}:teacher"
    base = ["--temperature", 1.0]
    _clean_failure(_cli("--teacher", t, "--input", tmp_path / "missing.npy", "--output", tmp_path / "c", "--k", 4,
                        *base), "no such file")
    _clean_failure(_cli("--teacher", t, "--input", tmp_path / "bad.txt", "--input-format", "ids", "--output",
                        tmp_path / "c", "--k", 4, *base), "not UTF-8")
    _clean_failure(_cli("--teacher", t, "--input", tmp_path / "ok.npy", "--output", tmp_path / "afile", "--k", 4,
                        *base), "is a file")
    _clean_failure(_cli("--teacher", f"{TEACHERS}:no_vocab", "--input", tmp_path / "ok.npy", "--output",
                        tmp_path / "c", "--k", 4, *base), "V = 0")
    _clean_failure(_cli("--teacher", t, "--input", tmp_path / "ok.npy", "--output", tmp_path / "c", "--k", 0, *base),
                   "--k must be positive")


# --- fused linear and the CLIs, part 3 (issue 21) -------------------------------------------------

def _head(n=6, hidden=8, vocab=20, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype) for shape in ((n, hidden), (vocab, hidden), (n, hidden),
                                                                          (vocab, hidden))]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_fused_linear_second_backward_of_a_retained_graph(reduction, chunk_size):
    """backward(retain_graph=True) then backward() again: the gradient doubles, as with any
    PyTorch loss (it was the mean gradient plus the sum-reduced one, or a crash with chunks)."""
    h, w, th, tw = _head()
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    x, y = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(x, y, teacher_hidden=th, teacher_weight=tw, labels=labels, temperature=2.0,
                                       reduction=reduction, chunk_size=chunk_size)
    loss.backward(retain_graph=True)
    once = (x.grad.clone(), y.grad.clone())
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * once[0])
    torch.testing.assert_close(y.grad, 2 * once[1])


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_fused_linear_refuses_a_weight_changed_in_place_before_backward(reduction):
    """reduction "none" runs the chunks again in backward: a head changed in place since forward
    gave the gradient at the new weight, silently; now autograd's in-place check says so."""
    h, w, th, tw = _head()
    x, y = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss = fastkd.fused_linear_kd_loss(x, y, teacher_hidden=th, teacher_weight=tw, reduction=reduction)
    with torch.no_grad():
        y.mul_(3)
    if reduction == "none":
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.sum().backward()
    else:  # the gradient was computed in forward, at the weight forward saw
        loss.backward()


def test_fused_linear_fp64_is_not_cast_by_autocast():
    h, w, th, tw = _head()
    plain = fastkd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, temperature=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = fastkd.fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, temperature=2.0)
    assert cast.dtype == torch.float64 and torch.equal(cast, plain)


@pytest.mark.parametrize("bad, match", [
    (dict(teacher_bias=torch.zeros(1, dtype=torch.float64)), r"teacher_bias must be \[20\]"),
    (dict(teacher_bias=torch.zeros(23, dtype=torch.float64)), r"teacher_bias must be \[20\]"),
    (dict(teacher_weight=torch.zeros(8, dtype=torch.float64)), r"teacher_weight must be \[V, H_t\]"),
    (dict(student_weight=torch.zeros(0, 8, dtype=torch.float64)), "student_weight .* has no rows"),
])
def test_fused_linear_names_a_misshapen_head(bad, match):
    h, w, th, tw = _head()
    args = dict(student_weight=w, teacher_hidden=th, teacher_weight=tw) | bad
    with pytest.raises(ValueError, match=match):
        fastkd.fused_linear_kd_loss(h, **args)


@pytest.mark.parametrize("call", [
    lambda: fastkd.kd_loss(torch.randn(3, 0), torch.randn(3, 0)),
    lambda: fastkd.topk_teacher(torch.randn(3, 0), k=1),
    lambda: fastkd.sample_teacher(torch.randn(3, 0), 4),
    lambda: fastkd.sparse_kd_loss(torch.randn(3, 0), fastkd.SparseTeacher(
        torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1), torch.zeros(3), 1.0, "topk")),
])
def test_an_empty_vocabulary_is_a_value_error_naming_v(call):
    with pytest.raises(ValueError, match="V=0"):
        call()


@pytest.mark.parametrize("argv, flag", [
    (["--shapes", "1024"], "--shapes"), (["--shapes", "0x10"], "--shapes"), (["--shapes", "10x0"], "--shapes"),
    (["--shapes", "10x"], "--shapes"), (["--shapes", "32x32,"], "--shapes"), (["--repeats", "0"], "--repeats"),
    (["--temperature", "0"], "--temperature"), (["--output", "."], "--output"), (["--impls", "bogus"], "--impls"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device")]))
@pytest.mark.slow
def test_bench_cli_mistakes_end_in_one_line_and_status_2(argv, flag):
    r = subprocess.run([sys.executable, "-m", "fastkd", "bench", *argv, "--no-progress"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert flag in r.stderr.strip().splitlines()[-1]


def test_demo_out_must_be_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "fastkd", "demo", "--out", str(f)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--out" in r.stderr.strip().splitlines()[-1]


def test_cli_help_speaks_to_users():
    r = subprocess.run([sys.executable, "-m", "fastkd", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0
    for command in ("info", "bench", "cache", "demo"):
        assert command in r.stdout
    assert "add_arguments" not in r.stdout and "one module per subcommand" not in r.stdout


def test_an_sdist_builds_without_torch(tmp_path):
    """`python -m build --sdist` runs setup.py where torch is not installed: an sdist is the
    sources alone (it stopped with "building needs torch installed first")."""
    code = ("import sys; sys.modules['torch'] = None; "  # import torch raises ImportError
            f"sys.argv = ['setup.py', '-q', 'sdist', '-d', {str(tmp_path)!r}]; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import tarfile

    (sdist,) = tmp_path.glob("fastkd-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    for part in ("kernels/dense_kd.cu", "csrc/kd_math.h", "fastkd/triton/_config.py", "setup.py"):
        assert any(n.endswith(part) for n in names), part


def test_make_builds_apart_from_pip_install():
    """`make test` after `pip install --no-build-isolation .` in one checkout recompiled everything:
    both built in build/temp.*, against different torch include paths. make keeps its own."""
    r = subprocess.run(["make", "-n", "build"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    line = [x for x in r.stdout.splitlines() if "build_ext --inplace" in x]
    assert line and "--build-temp build/inplace" in line[-1], r.stdout
