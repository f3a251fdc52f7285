"""The GPU checks that run without a GPU: tools/triton_check.py (every Triton kernel through Triton's
real compiler -- make test runs its covering subset, so here only what it derives and how it judges),
tools/cuda_resources.py (the ptxas reports of make cuda-check), tools/gpu_smoke.py and
tools/gpu_report.sh (make gpu-report), each as a user or CI runs it."""
import ast
import importlib
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cuda_resources  # noqa: E402
import triton_check  # noqa: E402

has_triton = importlib.util.find_spec("triton") is not None


def _launched_kernels():
    """Every kernel of fastkd/triton that a launcher starts: the @triton.jit functions passed to
    _config.launch (read from the source, so no Triton import is needed)."""
    names = set()
    for path in (ROOT / "fastkd" / "triton").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "launch" and node.args:
                names.add(node.args[0].id)
    return names


@pytest.fixture(scope="module")
def listed():
    if not has_triton:
        pytest.skip("triton not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_check.py"), "--list"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300, check=True).stdout
    return json.loads(out)


def test_every_launched_kernel_is_compiled(listed):
    """A kernel added to fastkd/triton is in the check the day it is launched."""
    partial = ("dense_kd_stats", "dense_kd_shard", "dense_kd_finish", "sparse_kd_stats", "sparse_kd_shard")
    assert {j["name"] for j in listed} == _launched_kernels() == {
        "_dense_kd_kernel", "_sparse_kd_kernel", "_topk_teacher_kernel", "_sample_teacher_kernel",
        *(f"_{op}_kernel" for op in partial)}
    subset = {j["kernel"] for j in listed if j["subset"]}
    assert subset == {"dense_kd", "sparse_kd", "topk_teacher", "sample_teacher_draws", *partial}


def test_the_subset_covers_every_code_path_at_the_largest_block(listed):
    subset = [j["key"] for j in listed if j["subset"]]
    for dtype in ("bf16", "fp16", "fp32", "fp64"):
        dense = {k[1] for k in subset if k[0] == "dense_kd" and k[2] == dtype}
        assert {o.split()[0] for o in dense} == {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                                                 "skew_reverse_kl", "tvd"}
        assert {o.split()[-1] for o in dense} == {"LHG", "-"}  # every flag on, and off
        sparse = {k[1].split()[0] for k in subset if k[0] == "sparse_kd" and k[2] == dtype}
        assert sparse == {"bucket", "renorm_teacher", "renorm_both"}
        shard = {k[1] for k in subset if k[0] == "dense_kd_shard" and k[2] == dtype}
        assert shard == {f"{d} LHG" for d in ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl",
                                              "tvd")}
    assert len(subset) == len({tuple(k) for k in subset})


def test_the_docs_table_lists_every_configuration(listed):
    """The launchers' choices and docs/kernel-resources.md agree row for row (make triton-check
    rewrites the table; make test compares the compiled subset's cells)."""
    doc = {key[:4] for key in triton_check.parse_doc_table()}
    want = {tuple(j["key"]) for j in listed}
    assert want == doc, ("docs/kernel-resources.md's Triton table is stale (run `make triton-check`): "
                         f"missing {sorted(want - doc)[:5]}, extra {sorted(doc - want)[:5]}")


def _job(dtype="bf16", warps=8):
    return {"kernel": "dense_kd", "options": "jsd LHG", "dtype": dtype, "block": 2048, "warps": warps,
            "autotune": False}


def _res(regs=100, spill=0, seconds=1.0, ok=True):
    return {"ok": ok, "regs": regs, "spill_st": spill, "seconds": seconds, "error": "CompilationError: at 3:4"}


def test_the_budgets():
    assert triton_check.verdict(_job(), _res()) == ""
    assert "spills 8 B" in triton_check.verdict(_job(), _res(spill=8))
    assert triton_check.verdict(_job("fp64"), _res(spill=8)) == ""  # fp64 may spill (listed)
    assert "129 registers at 8 warps" in triton_check.verdict(_job(), _res(regs=129))
    assert triton_check.verdict(_job(warps=4), _res(regs=200)) == ""
    assert "compiled in 31" in triton_check.verdict(_job(), _res(seconds=31.0))
    assert triton_check.verdict(_job(), _res(ok=False)).startswith("FAILED: CompilationError")


PTXAS_LOG = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_ZN6fastkd4cuda44_GLOBAL__N__1f5e8686_11_dense_kd_cu_fdd3b72515dense_kd_kernelIfLNS_10DivergenceE0EEEvNS1_11DenseLaunchE' for 'sm_90a'
ptxas info    : Function properties for _ZN6fastkd4cuda44_GLOBAL__N__1f5e8686_11_dense_kd_cu_fdd3b72515dense_kd_kernelIfLNS_10DivergenceE0EEEvNS1_11DenseLaunchE
    {stack} bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads
ptxas info    : Used {regs} registers, used 1 barriers, 1680 bytes smem
"""


@pytest.mark.parametrize("regs, spill, problem", [(64, 0, None), (64, 4, "spills 4 B"), (72, 0, "72 registers")])
def test_cuda_resources_judges_ptxas_reports(tmp_path, regs, spill, problem):
    log = tmp_path / "dense_kd.log"
    log.write_text(PTXAS_LOG.format(stack=spill, spill=spill, regs=regs))
    rows = cuda_resources.parse([log])
    assert [r[1:4] for r in rows] == [("sm_90a", "dense_kd_kernel<float, D=0>", regs)]
    found = cuda_resources.problems(rows, cuda_resources.plan_constants())
    assert (found == []) if problem is None else (problem in found[0])


def test_cuda_resources_table_is_current():
    """The CUDA table of docs/kernel-resources.md is what the last cuda-check reported (when make
    test ran cuda-check here, i.e. nvcc is on the PATH)."""
    logs = sorted((ROOT / "build" / "cuda-check").glob("*.log"))
    if not logs:
        pytest.skip("no build/cuda-check/*.log: nvcc not on the PATH, make cuda-check did not run")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_resources.py"), "--check", *map(str, logs)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_report_without_a_gpu_ends_at_once_and_says_so(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "OUT": str(out), "GPU_PY": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.time()
    r = subprocess.run(["bash", str(ROOT / "tools" / "gpu_report.sh")], capture_output=True, text=True, env=env,
                       timeout=120)
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0 and time.time() - t0 < 60, r.stdout + r.stderr
    assert "no GPU" in summary and "== done after" in summary


@pytest.mark.skipif(not has_triton, reason="triton not installed")
def test_gpu_smoke_runs_on_cpu_tensors():
    """tools/gpu_smoke.py, the smoke test of make gpu-report, on CPU tensors (Triton under its
    interpreter): every case passes against backend torch, one line each."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_smoke.py"), "cpu,triton", "--tiny", "--device",
                        "cpu"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith(("PASS", "FAIL", "ERROR"))]
    assert len(lines) == 2 * 2 * (2 + 1 + 3 + 1) and all(line.startswith("PASS") for line in lines)
