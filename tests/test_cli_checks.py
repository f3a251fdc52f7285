"""The command line refuses a bad argument before any work, naming the flag, in one line with exit
status 2 (not a traceback minutes in); a command whose optional packages are missing says which
extra to install before it starts; budget and estimator edge cases. In-process: fastkd.cli.main."""
import importlib.util
import time

import pytest
import torch

import fastkd
from fastkd.cache import budget
from fastkd.cli import main


def _refused(capsys, argv, *needles):
    began = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err and time.perf_counter() - began < 20
    return err


# the teacher spec names nothing: each check must come before the teacher is loaded
CACHE = ["cache", "--teacher", "no_such_module:fn", "--input", "x.npy", "--output", "out"]


@pytest.mark.parametrize("extra, needles", [
    (["--unique", "4", "--temperature", "0"], ["--temperature", "positive and finite"]),
    (["--unique", "4", "--temperature", "nan"], ["--temperature"]),
    (["--unique", "4", "--temperature", "-1"], ["--temperature"]),
    (["--k", "4", "--temperature", "1", "--device", "bogus"], ["--device 'bogus'"]),
    (["--k", "4", "--temperature", "1", "--seed", str(10 ** 20)], ["--seed"]),
    (["--budget-bytes", "40", "--temperature", "0"], ["--temperature"]),
])
def test_cache_checks_come_first(capsys, extra, needles):
    err = _refused(capsys, CACHE + extra, *needles)
    assert "--output" not in err.splitlines()[-1] and "--budget-bytes" not in err.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA: --device cuda is valid here")
def test_cache_device_cuda_without_cuda(capsys):
    _refused(capsys, CACHE + ["--k", "4", "--temperature", "1", "--device", "cuda"], "sees no CUDA device")


@pytest.mark.parametrize("extra, needles", [
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--seeds", "0"], ["--seeds must be at least 1"]),
])
def test_study_checks_come_first(capsys, tmp_path, extra, needles):
    _refused(capsys, ["study", "cache", "--quick", "--out", str(tmp_path)] + extra, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


@pytest.mark.parametrize("command", [["demo", "--quick"], ["study", "cache", "--quick"]])
def test_missing_extra_is_named_before_any_work(capsys, tmp_path, monkeypatch, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    _refused(capsys, command + ["--out", str(tmp_path)], "needs matplotlib", "pip install 'fastkd[demo]'")
    assert list(tmp_path.iterdir()) == []


def test_budget_picks_every_id_when_it_fits():
    """V = 32: top-32 (every id, the exact teacher) costs 59.6 B/token; any budget from there picks it,
    not a 255-draw sampled cache scored by the V = 8192 frontier's absolute sizes."""
    probe = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    full = budget.topk_bytes(32, 32)
    for b in (full, 60.0, 200.0, 1000.0):
        pick = budget.choose(b, probe, 1.0)
        assert (pick["kind"], pick["k"]) == ("topk", 32), pick
    assert budget.choose(full - 1, probe, 1.0).get("k") != 32


@pytest.mark.parametrize("bad", [-1, 0, 2.5, True])
def test_expected_unique_takes_positive_int_draws(bad):
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        fastkd.expected_unique(torch.randn(4, 16), bad)


def test_sampled_reverse_kl_of_no_sequences_is_zero():
    lq = torch.zeros(0, 5, requires_grad=True)
    loss = fastkd.sampled_reverse_kl(lq, torch.zeros(0, 5))
    loss.backward()
    assert loss.item() == 0.0 and lq.grad.shape == (0, 5)
