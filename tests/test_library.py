"""torch.library integration (opcheck, torch.compile), the public surface, and the CLI."""
import inspect
import json
import subprocess
import sys

import pytest
import torch

import fastkd
from conftest import CPU_BACKENDS, COMPILED_CPU_BACKENDS, logits, loss_and_grad

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, reduction):
    s, t = logits((4, 3, 50)), logits((4, 3, 50), seed=1)
    lab = torch.randint(0, 50, (4, 3))
    lab[0, 0] = -100

    def f(x, y, lab):
        return fastkd.kd_loss(x, y, temperature=2.0, labels=lab, hard_weight=0.1,
                              reduction=reduction, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want, want_g = loss_and_grad(f, s, t, lab)
    got, got_g = loss_and_grad(compiled, s, t, lab)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_g, want_g)


@pytest.mark.slow
def test_torch_compile_inductor_in_a_model():
    """fullgraph Inductor compile of a small student step: logits -> kd_loss -> backward."""
    lin = torch.nn.Linear(16, 40)
    h, t = logits((8, 16)), logits((8, 40), seed=1)

    def step(h, t):
        return fastkd.kd_loss(lin(h), t, temperature=2.0)

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(h, t)
    loss.backward()
    got = lin.weight.grad.clone()
    lin.zero_grad()
    step(h, t).backward()
    torch.testing.assert_close(got, lin.weight.grad, rtol=1e-5, atol=1e-7)


def test_module_has_the_functions_defaults():
    fn = inspect.signature(fastkd.kd_loss).parameters
    mod = inspect.signature(fastkd.KDLoss.__init__).parameters
    for name, p in mod.items():
        if name == "self":
            continue
        assert fn[name].default == p.default, name
    assert set(fn) - set(mod) == {"student_logits", "teacher_logits", "labels"}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module_matches_function(backend):
    s, t = logits((5, 30)), logits((5, 30), seed=1)
    lab = torch.randint(0, 30, (5,))
    m = fastkd.KDLoss(temperature=3.0, divergence="reverse_kl", hard_weight=0.5, backend=backend)
    assert "reverse_kl" in repr(m)
    torch.testing.assert_close(
        m(s, t, lab),
        fastkd.kd_loss(s, t, temperature=3.0, divergence="reverse_kl", hard_weight=0.5, labels=lab, backend=backend),
    )


def test_available_backends_and_auto():
    avail = fastkd.available_backends()
    assert avail[0] == "torch"
    assert set(avail) <= {"torch", "cpu", "triton", "cuda"}
    from fastkd import backends

    assert backends.resolve("dense_kd", "auto", torch.device("cpu")) == ("cpu" if "cpu" in avail else "torch")
    assert backends.resolve("dense_kd", "auto", torch.device("meta")) == "torch"


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "fastkd", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends:" in out and "torch   available" in out
    if COMPILED_CPU_BACKENDS:
        assert "cpu     available" in out and "cpu_isa" in out


def test_build_info_records_the_build():
    from fastkd import _ext

    info = _ext.build_info()
    if not info["loaded"]:
        pytest.skip("fastkd._C not built")
    assert info["torch"] == torch.__version__
    assert info["cuda"] is False or isinstance(info["cuda_version"], str)
    assert "-O3" in info["cxx_flags"] or "-O0" in info["cxx_flags"]
    assert info["cpu_isa"] in ("avx512", "avx2", "default")


def test_cli_bench_small(tmp_path):
    out = tmp_path / "table.md"
    res = subprocess.run(
        [sys.executable, "-m", "fastkd", "bench", "--shapes", "64x1000", "--repeats", "1",
         "--impls", "fastkd,eager", "--output", str(out), "--json", "-", "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    rows = json.loads(res.stdout[res.stdout.index("["):])
    assert [r["impl"] for r in rows] == ["fastkd", "eager"]
    assert all(r["median_ms"] > 0 for r in rows)
    assert "| 64 | 1000 | fp32 | fastkd |" in out.read_text()
