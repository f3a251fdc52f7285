"""The demo's pipeline at a tiny size (seconds): corpus split, tokenizer, a few teacher steps, the
cache round trip through the CLI, a few steps of each method, results.json and loss_curves.png;
bad flags; Ctrl-C leaves no half-written results."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--max-files", "12", "--vocab", "300", "--teacher-tokens", "2048", "--student-tokens", "1024",
        "--seq-len", "32", "--batch-size", "4", "--no-progress"]


def _demo(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fastkd", "demo", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, **kw)


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = _demo(*TINY, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert set(report["methods"]) == {"hard_labels", "dense_kd", "topk_bucket", "topk_renorm_teacher",
                                      "topk_renorm_both", "sampled_kd", "on_policy"}
    on_policy = report["methods"]["on_policy"]
    assert on_policy["generation_s"] > 0 and on_policy["loss_s"] > 0 and "on_policy: the first half" in r.stdout
    for r_ in report["methods"].values():
        assert {"val_loss", "val_ppl", "ece", "top1_agreement", "tokens_per_s", "peak_mem_mb"} <= set(r_)
        assert r_["val_loss"] > 0 and r_["tokens"] == 1024
    assert report["cache"]["topk"]["bytes_per_token"] > 0 and report["config"]["temperature"] == 1.0
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "| dense_kd, naive loss" in r.stdout and "validation files" in r.stdout
    assert report["config"]["teacher_tokens"] >= 2048 and not report["config"]["teacher_cut_short"]
    assert "WARNING" not in r.stderr


@pytest.mark.slow
def test_the_teacher_trains_to_a_token_budget_and_a_cut_says_so(tmp_path):
    """The teacher trained for a wall-clock budget: a slow machine silently got a far weaker one
    (ppl 158 instead of 13). Now it trains to --teacher-tokens, and the --teacher-seconds guard,
    when it stops training first, says so loudly and in results.json."""
    out = tmp_path / "demo"
    args = [a for a in TINY if a not in ("--teacher-tokens", "2048")]
    r = _demo(*args, "--methods", "hard_labels", "--teacher-tokens", 100_000_000, "--teacher-seconds", 2, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["teacher_cut_short"] and config["teacher_tokens"] < 100_000_000
    assert "WARNING: the teacher's training was cut short by --teacher-seconds 2" in r.stderr


@pytest.mark.parametrize("flags, needle", [(["--methods", "bogus"], "--methods: unknown bogus"),
                                           (["--vocab", "1"], "--vocab must be at least 2"),
                                           (["--hard-weight", "2"], "--hard-weight must lie in [0, 1]")])
@pytest.mark.slow
def test_bad_flags(tmp_path, flags, needle):
    r = _demo(*flags, "--out", tmp_path / "x")
    assert r.returncode != 0 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_leaves_no_half_written_results(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.Popen([sys.executable, "-m", "fastkd", "demo", *TINY[:4], "--teacher-tokens", "100000000",
                          *TINY[6:], "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while not (out / "work").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # inside the teacher's training
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "no results written" in err
    assert not (out / "results.json").exists() and not (out / "loss_curves.png").exists()
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.slow
def test_a_second_run_into_one_out_with_another_seed(tmp_path):
    """The cache of the first run (another corpus split) made the second exit 1 after training its
    teacher, with a message about an --input the user never gave: the demo's scratch is its own."""
    out = tmp_path / "demo"
    for seed in (0, 1):
        r = _demo(*TINY, "--methods", "topk_bucket", "--seed", seed, "--out", out)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads((out / "results.json").read_text())["config"]["seeds"][0] == seed


def test_on_policy_batches_keep_the_prompt_and_train_on_the_samples_only():
    from fastkd.cli import demo

    torch = pytest.importorskip("torch")
    model = demo.TinyLM(vocab=50, d=16, layers=1, heads=2, seq_len=12)
    b = torch.randint(0, 50, (3, 13), generator=torch.Generator().manual_seed(0))
    timing = {"generation_s": 0.0}
    seq, labels = demo.on_policy_batch(model, b, torch.Generator().manual_seed(1), timing)
    half = 13 // 2
    assert seq.shape == b.shape and torch.equal(seq[:, :half], b[:, :half]) and timing["generation_s"] > 0
    assert (labels[:, :half - 1] == -100).all() and torch.equal(labels[:, half - 1:], seq[:, half:])
    again, _ = demo.on_policy_batch(model, b, torch.Generator().manual_seed(1), timing)
    assert torch.equal(seq, again)  # seeded: the same samples
