"""fastkd.cache: round trips, fidelity, random access, the Dataset, corruption, resume, the CLI."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastkd
from fastkd.cache import CacheError, CacheWriter, TeacherCache, TeacherCacheDataset
from fastkd.cache import _bits, _codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "tests", "cache_teacher.py") + ":teacher"


def _sorted(t: fastkd.SparseTeacher):
    lp, order = t.logprobs.sort(dim=-1, descending=True, stable=True)
    return t.indices.gather(-1, order), lp


def _write(directory, teacher, tokens=None, shard_tokens=1 << 16, step=None, **kw):
    n = teacher.indices.shape[0]
    step = step or n
    settings = dict(vocab_size=kw.pop("vocab_size"), temperature=teacher.temperature, teacher="test",
                    has_tokens=tokens is not None, shard_tokens=shard_tokens)
    if teacher.kind == "topk":
        settings["k"] = teacher.indices.shape[-1]
    else:
        settings.update(kind="sampled", num_samples=kw.pop("num_samples"))
    with CacheWriter(str(directory), **settings, **kw) as w:
        for a in range(0, n, step):
            rows = fastkd.SparseTeacher(teacher.indices[a:a + step], teacher.logprobs[a:a + step],
                                        teacher.tail_logmass[a:a + step], teacher.temperature, teacher.kind)
            w.append(rows, None if tokens is None else tokens[a:a + step])
    return TeacherCache(str(directory))


def _mass99_error(exact_lp, decoded_lp):
    """Largest |error| over the entries of each row's smallest prefix (by probability) that
    carries 99% of the row's stored mass."""
    p = exact_lp.double().exp()
    before = p.cumsum(-1) - p
    inside = before < 0.99 * p.sum(-1, keepdim=True)
    err = (exact_lp - decoded_lp).abs()
    return err[inside & torch.isfinite(exact_lp)].max().item()


@pytest.mark.parametrize("bits", [1, 2, 7, 8, 9, 15, 17, 24])
def test_bit_packing_round_trips_every_window(bits):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 1 << bits, (203,), generator=g)
    stream = _bits.pack(values, bits)
    assert stream.dtype == torch.uint8 and stream.numel() == _bits.packed_bytes(203, bits)
    for a, b in [(0, 203), (1, 9), (8, 16), (13, 14), (200, 203), (50, 50)]:
        assert torch.equal(_bits.unpack(stream, bits, a, b).long(), values[a:b])
    top = torch.full((5,), (1 << bits) - 1)
    assert torch.equal(_bits.unpack(_bits.pack(top, bits), bits, 0, 5).long(), top)


DECODERS = ["torch"] + (["cpu"] if fastkd._ext.loaded() else [])


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("bits", [1, 5, 8, 15, 17, 24])
def test_unpack_backends(backend, bits):
    values = torch.randint(0, 1 << bits, (1001,), generator=torch.Generator().manual_seed(bits))
    stream = _bits.pack(values, bits)
    for a, b in [(0, 1001), (3, 4), (8, 800), (990, 1001), (10, 10)]:
        got = _bits.unpack(stream, bits, a, b, backend)
        assert got.dtype == torch.long and torch.equal(got, values[a:b])


@pytest.mark.parametrize("backend", DECODERS)
@pytest.mark.parametrize("count", [0, 1, 7, 63, 255])
def test_monotone_bitmap_round_trip(backend, count):
    g = torch.Generator().manual_seed(count)
    values = torch.randint(0, 256, (50, count), generator=g).sort(-1).values
    values[0] = 255  # every value at the top
    values[1] = 0
    bitmap = _bits.pack_monotone(values, 255)
    assert bitmap.shape == (50, _bits.monotone_bytes(count, 255))
    assert torch.equal(_bits.unpack_monotone(bitmap, count, backend), values.long())
    if count:
        broken = bitmap.clone()
        broken[:, 0] = 0  # drops value 0 of row 1 (and others): rows no longer hold `count` ones
        with pytest.raises((RuntimeError, ValueError), match="expected"):
            _bits.unpack_monotone(broken, count, backend)


def test_decoder_opcheck():
    stream = _bits.pack(torch.randint(0, 1 << 13, (77,)), 13)
    bitmap = _bits.pack_monotone(torch.randint(0, 256, (9, 40)).sort(-1).values, 255)
    for suffix in [""] * (len(DECODERS) - 1) + ["_torch"]:
        torch.library.opcheck(getattr(torch.ops.fastkd, "unpack_bits" + suffix), (stream, 13, 5, 70))
        torch.library.opcheck(getattr(torch.ops.fastkd, "unpack_monotone" + suffix), (bitmap, 40))


def test_delta_table_is_monotone_and_linear_where_promised():
    q = _codec.logprob_quantisation(64)
    table = _codec.delta_table(q).double()
    assert table[0] == 0 and torch.isinf(table[255])
    assert (table[1:255] > table[:254]).all()
    assert table[q["linear_codes"] - 1] >= math.log(100 * 63)  # the 99%-mass reach for k = 64
    assert q["step"] / 2 < 0.02
    assert table[254] == pytest.approx(q["max_delta"], rel=1e-6)


@pytest.mark.parametrize("scale,temperature", [(1.0, 1.0), (3.0, 2.0), (10.0, 1.0), (30.0, 0.7)])
def test_topk_round_trip_fidelity(tmp_path, scale, temperature):
    g = torch.Generator().manual_seed(int(scale * 10))
    logits = torch.randn(300, 5000, generator=g) * scale
    logits[::7, 100:] = float("-inf")  # rows with only 100 finite entries: fewer than k? no, 100 > 64
    exact = fastkd.topk_teacher(logits, k=64, temperature=temperature)
    cache = _write(tmp_path, exact, vocab_size=5000, shard_tokens=128, step=50)
    got = cache[:]
    ids, lp = _sorted(exact)
    assert torch.equal(got.indices, ids)
    assert torch.equal(got.logprobs[:, 0], lp[:, 0])  # the top entry is stored exactly
    assert torch.equal(got.tail_logmass, exact.tail_logmass)
    assert _mass99_error(lp, got.logprobs) <= 0.02
    q = cache.manifest["logprob_quantisation"]
    near = (lp[:, 0:1] - lp) <= (q["linear_codes"] - 1) * q["step"]
    assert (got.logprobs - lp).abs()[near].max() <= q["step"] / 2 + 1e-5
    assert got.temperature == temperature and got.kind == "topk"


def test_topk_padding_and_empty_rows_round_trip(tmp_path):
    logits = torch.randn(4, 50)
    logits[1, 5:] = float("-inf")  # 5 finite entries, k = 8: three -inf pads
    logits[2] = float("-inf")  # no finite entry at all
    exact = fastkd.topk_teacher(logits, k=8, temperature=1.0)
    got = _write(tmp_path, exact, vocab_size=50)[:]
    ids, lp = _sorted(exact)
    assert torch.equal(torch.isinf(got.logprobs), torch.isinf(lp))
    assert torch.equal(got.indices[torch.isfinite(lp)], ids[torch.isfinite(lp)])
    assert not torch.isnan(got.logprobs).any() and not torch.isnan(got.tail_logmass).any()
    assert torch.equal(got.tail_logmass, exact.tail_logmass)


def test_sampled_round_trip_is_exact(tmp_path):
    logits = torch.randn(257, 3000) * 2
    exact = fastkd.sample_teacher(logits, num_samples=12, temperature=2.0,
                                  generator=torch.Generator().manual_seed(3))
    cache = _write(tmp_path, exact, vocab_size=3000, num_samples=12, shard_tokens=100, step=40)
    got = cache[:]
    assert torch.equal(got.indices, exact.indices)
    torch.testing.assert_close(got.logprobs, exact.logprobs, rtol=0, atol=1e-6)
    assert torch.isinf(got.tail_logmass).all() and got.kind == "sampled"
    torch.testing.assert_close(fastkd.sparse_kd_loss(logits, got, tail="renorm_teacher"),
                               fastkd.sparse_kd_loss(logits, exact, tail="renorm_teacher"))


def test_bytes_per_token_targets(tmp_path):
    """The format's size at V = 32000 (ids at 15 bits): top-64 <= 200 B/token, sampled-12 <= 40,
    counting everything in the shards (input token ids and headers included)."""
    n, vocab = 4096, 32000
    logits = torch.randn(n, vocab) * 2
    tokens = torch.randint(0, vocab, (n,))
    top = _write(tmp_path / "top", fastkd.topk_teacher(logits, k=64, temperature=2.0), tokens, vocab_size=vocab)
    sampled = _write(tmp_path / "sampled", fastkd.sample_teacher(logits, num_samples=12, temperature=2.0),
                     tokens, vocab_size=vocab, num_samples=12)
    assert top.bytes_per_token <= 200, top.bytes_per_token
    assert sampled.bytes_per_token <= 40, sampled.bytes_per_token
    assert torch.equal(top.tokens(0, n), tokens) and torch.equal(sampled.tokens(5, 900), tokens[5:900])


def test_random_access_across_shards(tmp_path):
    logits = torch.randn(1000, 700)
    exact = fastkd.topk_teacher(logits, k=16, temperature=1.5)
    tokens = torch.randint(0, 700, (1000,))
    cache = _write(tmp_path, exact, tokens, vocab_size=700, shard_tokens=96, step=32)
    assert len(cache) == 1000 and len(cache.manifest["shards"]) == 11  # 10 of 96 and one of 40
    whole = cache[:]
    for a, b in [(0, 1), (95, 97), (90, 420), (999, 1000), (300, 300), (0, 1000)]:
        part = cache.read(a, b)
        assert torch.equal(part.indices, whole.indices[a:b]) and torch.equal(part.logprobs, whole.logprobs[a:b])
        assert torch.equal(cache.tokens(a, b), tokens[a:b])
    row = cache[-1]
    assert torch.equal(row.indices, whole.indices[999]) and row.tail_logmass.shape == ()
    with pytest.raises(IndexError, match=r"\[0, 1000\)"):
        cache.read(990, 1001)


def test_dataset_and_dataloader(tmp_path):
    vocab, seq = 300, 16
    logits = torch.randn(5 * seq + 3, vocab)
    tokens = torch.randint(0, vocab, (5 * seq + 3,))
    cache = _write(tmp_path, fastkd.topk_teacher(logits, k=8, temperature=2.0), tokens,
                   vocab_size=vocab, shard_tokens=20, step=7, seq_len=seq)
    ds = TeacherCacheDataset(cache)
    assert len(ds) == 5  # the last 3 tokens do not fill a sequence
    item = ds[2]
    assert item["indices"].shape == (seq, 8) and torch.equal(item["input_ids"], tokens[2 * seq:3 * seq])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False)))
    teacher = ds.teacher(batch)
    assert teacher.indices.shape == (2, seq, 8) and teacher.temperature == 2.0
    loss = fastkd.sparse_kd_loss(logits[:2 * seq].view(2, seq, vocab), teacher)
    assert torch.isfinite(loss)
    with pytest.raises(IndexError):
        ds[5]


def test_reader_refuses_mismatched_vocab_and_temperature(tmp_path):
    _write(tmp_path, fastkd.topk_teacher(torch.randn(10, 100), k=4, temperature=2.0), vocab_size=100)
    with pytest.raises(CacheError, match="vocab_size=100.*vocab_size=128"):
        TeacherCache(str(tmp_path), vocab_size=128)
    with pytest.raises(CacheError, match="temperature=2.0.*temperature=1.0"):
        TeacherCache(str(tmp_path), temperature=1.0)
    assert len(TeacherCache(str(tmp_path), vocab_size=100, temperature=2.0)) == 10
    with pytest.raises(CacheError, match="not a fastkd teacher cache"):
        TeacherCache(str(tmp_path / "nothing"))


def test_writer_refuses_other_settings_and_bad_rows(tmp_path):
    t = fastkd.topk_teacher(torch.randn(10, 100), k=4, temperature=2.0)
    _write(tmp_path, t, vocab_size=100)
    with pytest.raises(CacheError, match="k: cache has 4, asked for 5"):
        CacheWriter(str(tmp_path), vocab_size=100, k=5, temperature=2.0, teacher="test", has_tokens=False)
    CacheWriter(str(tmp_path), vocab_size=100, k=4, temperature=2.0, teacher="test", has_tokens=False).close()
    w = CacheWriter(str(tmp_path / "b"), vocab_size=100, k=4, temperature=2.0, teacher="test")
    with pytest.raises(ValueError, match="temperature=1.0 but the cache was made at temperature=2.0"):
        w.append(fastkd.topk_teacher(torch.randn(3, 100), k=4, temperature=1.0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="top-4 rows, got topk rows with 5"):
        w.append(fastkd.topk_teacher(torch.randn(3, 100), k=5, temperature=2.0), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="pass them with the rows"):
        w.append(t)
    bad = t._replace(indices=t.indices + 100)
    with pytest.raises(ValueError, match=r"vocab_size=100"):
        w.append(bad, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="do not fit indices"):
        w.append(t._replace(tail_logmass=t.tail_logmass[:3]), torch.zeros(10, dtype=torch.long))
    ws = CacheWriter(str(tmp_path / "s"), vocab_size=100, kind="sampled", num_samples=4, temperature=2.0,
                     teacher="t", has_tokens=False)
    fake = fastkd.SparseTeacher(t.indices, torch.full((10, 4), -1.0), t.tail_logmass, 2.0, "sampled")
    with pytest.raises(ValueError, match=r"log\(count / 4\)"):
        ws.append(fake)
    with pytest.raises(ValueError, match="num_samples must be an int in"):
        CacheWriter(str(tmp_path / "c"), vocab_size=100, kind="sampled", num_samples=0, temperature=1.0, teacher="t")
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        CacheWriter(str(tmp_path / "d"), vocab_size=1 << 25, k=4, temperature=1.0, teacher="t")


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("where", ["data", "header", "last"])
def test_a_flipped_shard_byte_is_detected(tmp_path, where):
    cache = _write(tmp_path, fastkd.topk_teacher(torch.randn(200, 300), k=8, temperature=1.0),
                   torch.randint(0, 300, (200,)), vocab_size=300, shard_tokens=100, step=100)
    shard = os.path.join(str(tmp_path), cache.manifest["shards"][1]["file"])
    size = os.path.getsize(shard)
    _flip(shard, {"data": size // 2, "header": 12, "last": size - 1}[where])
    fresh = TeacherCache(str(tmp_path))
    assert fresh.read(0, 100).indices.shape == (100, 8)  # shard 0 is intact
    with pytest.raises(CacheError, match="shard-00001.*sha256 mismatch"):
        fresh.read(150, 160)
    with pytest.raises(CacheError, match="sha256 mismatch"):
        TeacherCache(str(tmp_path)).verify_all()


def test_a_damaged_manifest_or_missing_shard_is_detected(tmp_path):
    _write(tmp_path, fastkd.topk_teacher(torch.randn(200, 300), k=8, temperature=1.0),
           vocab_size=300, shard_tokens=100, step=100)
    path = os.path.join(str(tmp_path), "manifest.json")
    manifest = json.load(open(path))
    manifest["temperature"] = 3.0  # an edit that leaves valid JSON
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CacheError, match="checksum mismatch"):
        TeacherCache(str(tmp_path))
    other = tmp_path / "other"
    cache = _write(other, fastkd.topk_teacher(torch.randn(200, 300), k=8, temperature=1.0),
                   vocab_size=300, shard_tokens=100)
    shard = os.path.join(str(other), cache.manifest["shards"][0]["file"])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 3)
    with pytest.raises(CacheError, match="truncated"):
        TeacherCache(str(other)).read(0, 1)
    os.remove(shard)
    with pytest.raises(CacheError, match="missing"):
        TeacherCache(str(other)).read(0, 1)


def test_shards_are_plain_safetensors(tmp_path):
    from safetensors import safe_open

    cache = _write(tmp_path, fastkd.topk_teacher(torch.randn(20, 300), k=8, temperature=1.0),
                   torch.randint(0, 300, (20,)), vocab_size=300)
    with safe_open(os.path.join(str(tmp_path), cache.manifest["shards"][0]["file"]), "pt") as f:
        assert set(f.keys()) == {"ids", "codes", "top_logprob", "tail_logmass", "tokens"}
        assert f.get_tensor("codes").shape == (20, 7) and f.metadata()["num_tokens"] == "20"


def _cli(*args, env=None):
    cmd = [sys.executable, "-m", "fastkd", "cache", "--no-progress", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_writes_what_topk_teacher_computes(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 1000, 200)
    np.save(tmp_path / "ids.npy", tokens)
    out = tmp_path / "cache"
    r = _cli("--teacher", TEACHER, "--input", tmp_path / "ids.npy", "--output", out, "--k", 16,
             "--temperature", 2.0, "--seq-len", 32, "--batch-size", 2, "--teacher-name", "toy")
    assert r.returncode == 0, r.stderr
    assert "200 tokens" in r.stdout and "tokens/s" in r.stdout
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from cache_teacher import teacher

    cache = TeacherCache(str(out), vocab_size=1000, temperature=2.0)
    assert cache.manifest["teacher"] == "toy" and cache.manifest["seq_len"] == 32
    ids = torch.from_numpy(tokens)
    assert torch.equal(cache.tokens(0, 200), ids)
    for a, b in [(0, 32), (160, 192), (192, 200)]:  # the last sequence is the short remainder
        exact = fastkd.topk_teacher(teacher(ids[a:b].view(1, -1))[0], k=16, temperature=2.0)
        got = cache.read(a, b)
        assert torch.equal(got.indices, _sorted(exact)[0])
        assert _mass99_error(_sorted(exact)[1], got.logprobs) <= 0.02


@pytest.mark.slow
def test_cli_killed_writer_resumes_to_the_same_cache(tmp_path):
    (tmp_path / "ids.txt").write_text(" ".join(map(str, np.random.default_rng(1).integers(0, 1000, 500))))
    common = ["--teacher", TEACHER, "--input", tmp_path / "ids.txt", "--input-format", "ids",
              "--num-samples", 12, "--temperature", 1.0, "--seq-len", 20, "--batch-size", 2,
              "--shard-tokens", 60, "--seed", 5]
    whole = _cli(*common, "--output", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = _cli(*common, "--output", tmp_path / "cut", env={"FASTKD_TEST_KILL_AFTER": "9"})
    assert killed.returncode == -9
    partial = TeacherCache(str(tmp_path / "cut"))
    assert 0 < len(partial) < 500  # the shards written before the kill are a valid cache
    (tmp_path / "cut" / "shard-00099.safetensors.tmp").write_bytes(b"half a shard")  # a killed rename
    resumed = _cli(*common, "--output", tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at token {len(partial)}" in resumed.stdout
    a, b = TeacherCache(str(tmp_path / "whole")), TeacherCache(str(tmp_path / "cut"))
    assert len(b) == 500 and not list((tmp_path / "cut").glob("*.tmp"))
    assert torch.equal(a[:].indices, b[:].indices) and torch.equal(a[:].logprobs, b[:].logprobs)
    assert torch.equal(a.tokens(0, 500), b.tokens(0, 500))
    assert [e["sha256"] for e in a.manifest["shards"]] == [e["sha256"] for e in b.manifest["shards"]]


@pytest.mark.slow
def test_cli_interrupted_keeps_whole_shards_and_resumes_byte_for_byte(tmp_path):
    np.save(tmp_path / "ids.npy", np.random.default_rng(3).integers(0, 1000, 300))
    common = ["--teacher", TEACHER, "--input", tmp_path / "ids.npy", "--k", 8, "--temperature", 1.0,
              "--seq-len", 10, "--batch-size", 3, "--shard-tokens", 60]
    r = _cli(*common, "--output", tmp_path / "cut", env={"FASTKD_TEST_INTERRUPT_AFTER": "5"})
    assert r.returncode == 130 and "run the same command to resume" in r.stderr
    # the probe is call 1; calls 2-4 appended three batches of 30 tokens before Ctrl-C: the first
    # two filled shard 0, the third was buffered and is dropped (a resumed run recomputes it)
    assert len(TeacherCache(str(tmp_path / "cut"))) == 60
    assert _cli(*common, "--output", tmp_path / "cut").returncode == 0
    assert _cli(*common, "--output", tmp_path / "whole").returncode == 0
    a, b = TeacherCache(str(tmp_path / "whole")), TeacherCache(str(tmp_path / "cut"))
    assert [e["sha256"] for e in a.manifest["shards"]] == [e["sha256"] for e in b.manifest["shards"]]


def test_one_writer_at_a_time_and_empty_caches(tmp_path):
    w = CacheWriter(str(tmp_path), vocab_size=50, k=4, temperature=1.0, teacher="t", has_tokens=False)
    with pytest.raises(CacheError, match="being written by another CacheWriter"):
        CacheWriter(str(tmp_path), vocab_size=50, k=4, temperature=1.0, teacher="t", has_tokens=False)
    w.close()
    empty = TeacherCache(str(tmp_path))
    assert len(empty) == 0 and empty[:].indices.shape == (0, 4) and len(TeacherCacheDataset(empty, 8)) == 0
    with CacheWriter(str(tmp_path), vocab_size=50, k=4, temperature=1.0, teacher="t", has_tokens=False) as w2:
        w2.append(fastkd.topk_teacher(torch.randn(3, 50), k=4, temperature=1.0))
    assert len(TeacherCache(str(tmp_path))) == 3


@pytest.mark.slow
def test_cli_refuses_what_it_cannot_use(tmp_path):
    np.save(tmp_path / "ids.npy", np.array([1, 2, 5000]))
    r = _cli("--teacher", TEACHER, "--input", tmp_path / "ids.npy", "--output", tmp_path / "c",
             "--k", 4, "--temperature", 1.0)
    assert r.returncode != 0 and "[0, 1000)" in r.stderr
    (tmp_path / "t.txt").write_text("hello world")
    r = _cli("--teacher", TEACHER, "--input", tmp_path / "t.txt", "--output", tmp_path / "c",
             "--k", 4, "--temperature", 1.0)
    assert r.returncode != 0 and "--tokenizer" in r.stderr
    np.save(tmp_path / "ok.npy", np.array([1, 2, 3]))
    r = _cli("--teacher", "no_such_module_x:f", "--input", tmp_path / "ok.npy", "--output", tmp_path / "c",
             "--k", 4, "--temperature", 1.0)
    assert r.returncode != 0 and "no_such_module_x" in r.stderr
    r = _cli("--teacher", TEACHER.replace(":teacher", ":not_logits"), "--input", tmp_path / "ok.npy",
             "--output", tmp_path / "c", "--k", 4, "--temperature", 1.0)
    assert r.returncode != 0 and "float logits [B, L, V]" in r.stderr


@pytest.mark.slow
def test_cli_with_a_local_hugging_face_model_and_text(tmp_path):
    """A tiny random-weight Llama and a word-level tokenizer, built here (nothing downloaded)."""
    transformers = pytest.importorskip("transformers")  # installed by `make test`
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = [f"w{i}" for i in range(60)]
    rng = np.random.default_rng(2)
    text = " ".join(rng.choice(words, 150))
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    model_dir = tmp_path / "tiny-llama"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(model_dir)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(model_dir)
    (tmp_path / "corpus.txt").write_text(text)
    r = _cli("--teacher", model_dir, "--input", tmp_path / "corpus.txt", "--output", tmp_path / "cache",
             "--k", 8, "--temperature", 2.0, "--seq-len", 40, "--batch-size", 2)
    assert r.returncode == 0, r.stderr
    cache = TeacherCache(str(tmp_path / "cache"), vocab_size=64, temperature=2.0)
    assert len(cache) == 150 and cache.manifest["teacher"] == "tiny-llama"
    ids = cache.tokens(0, 150)
    assert torch.equal(ids, torch.tensor(tok.encode(text).ids))
    with torch.no_grad():
        exact = fastkd.topk_teacher(model(input_ids=ids[40:80].view(1, -1)).logits[0], k=8, temperature=2.0)
    got = cache.read(40, 80)
    assert torch.equal(got.indices, _sorted(exact)[0])
    assert _mass99_error(_sorted(exact)[1], got.logprobs) <= 0.02


def test_cache_pickles_small_and_serves_dataloader_workers(tmp_path):
    import pickle

    vocab, seq = 300, 8
    cache = _write(tmp_path, fastkd.topk_teacher(torch.randn(64, vocab), k=4, temperature=1.0),
                   torch.randint(0, vocab, (64,)), vocab_size=vocab, seq_len=seq, shard_tokens=16, step=16)
    cache.read(0, 64)  # maps every shard
    blob = pickle.dumps(cache)
    assert len(blob) < 20_000
    assert torch.equal(pickle.loads(blob)[:].indices, cache[:].indices)
    ds = TeacherCacheDataset(cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = torch.cat([b["indices"] for b in loader])
    assert torch.equal(got.view(64, 4), cache[:].indices)


from hypothesis import given, strategies as st  # noqa: E402

from test_properties import SETTINGS  # noqa: E402


@SETTINGS
@given(data=st.data(), vocab=st.integers(2, 3000), kind=st.sampled_from(["topk", "sampled"]),
       rows=st.integers(0, 60), shard_tokens=st.integers(1, 50), step=st.integers(1, 30),
       scale=st.sampled_from([0.1, 1.0, 5.0, 30.0]), masked=st.booleans())
def test_round_trip_properties(data, vocab, kind, rows, shard_tokens, step, scale, masked):
    """Any V, k, rows, shard size and append size: every window decodes to what was written
    (top-k: same ids, log-probs within the code's bound where it is linear; sampled: exact)."""
    import tempfile

    k = data.draw(st.integers(1, min(vocab, 80)), label="k")
    t = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows + vocab)) * scale
    if masked and rows:
        t[0, min(vocab - 1, k // 2 + 1):] = float("-inf")
    teacher = (fastkd.topk_teacher(t, k=k, temperature=1.0) if kind == "topk"
               else fastkd.sample_teacher(t, num_samples=k, temperature=1.0))
    tokens = torch.randint(0, vocab, (rows,))
    extra = {} if kind == "topk" else {"num_samples": k}
    with tempfile.TemporaryDirectory() as d:
        cache = _write(d, teacher, tokens, vocab_size=vocab, shard_tokens=shard_tokens, step=step, **extra)
        assert len(cache) == rows
        a = data.draw(st.integers(0, rows), label="start")
        b = data.draw(st.integers(a, rows), label="stop")
        got = cache.read(a, b)
        assert torch.equal(cache.tokens(a, b), tokens[a:b])
        if kind == "sampled":
            assert torch.equal(got.indices, teacher.indices[a:b])
            torch.testing.assert_close(got.logprobs, teacher.logprobs[a:b], rtol=0, atol=1e-6)
            return
        ids, lp = _sorted(teacher)
        ids, lp = ids[a:b], lp[a:b]
        fin = torch.isfinite(lp)
        assert torch.equal(torch.isfinite(got.logprobs), fin) and torch.equal(got.indices[fin], ids[fin])
        q = cache.manifest["logprob_quantisation"]
        near = fin & ((lp[:, :1] - lp) <= (q["linear_codes"] - 1) * q["step"])
        assert ((got.logprobs - lp).abs()[near] <= q["step"] / 2 + 1e-5).all()
        assert torch.equal(got.tail_logmass, teacher.tail_logmass[a:b])
