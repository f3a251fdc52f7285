"""The CUDA backend without a GPU: its device code (kernels/) includes no torch header and
compiles with nvcc alone for sm_80 and sm_90a, with one kernel per dtype (and divergence), the
thread-block-cluster path on sm_90a only; each CUDA op of the dispatch table has its kernel file
and ATen launcher; kernels/plan.h's choices (exposed as fastkd._C.cuda_plan) are the documented
ones. The kernels' values are checked against backend "torch" on a GPU (test_dispatch.py,
test_gpu.py through the dispatch table)."""
import pathlib
import re
import shutil
import subprocess

import pytest

from fastkd import _ext, backends

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
CUDA_OPS = [op for op, impls in backends.OPS.items() if "cuda" in impls]
# kernels each file instantiates: one per logits dtype (x 6 divergences for dense_kd)
ENTRIES = {"dense_kd": 24, "sparse_kd": 4, "topk_teacher": 4, "sample_teacher_draws": 4}
CLUSTERED = {"dense_kd", "sparse_kd"}  # split a row over a cluster on sm_90
ALLOWED = {"cuda_runtime.h", "cuda_runtime_api.h", "cuda_bf16.h", "cuda_fp16.h", "cooperative_groups.h",
           "cstdint", "cstdlib", "climits", "type_traits", "kd_math.h", "sparse_math.h", "launch.h", "plan.h",
           "rows.cuh"}
nvcc = shutil.which("nvcc")


def test_device_code_includes_only_cuda_and_the_shared_math():
    for path in sorted(KERNELS.iterdir()):
        for inc in re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), re.M):
            assert inc in ALLOWED, f"{path.name} includes {inc}: kernels/ takes CUDA headers and csrc/*_math.h only"


def test_every_cuda_op_has_its_kernel_and_launcher():
    assert set(CUDA_OPS) == set(ENTRIES)
    for op in CUDA_OPS:
        assert (KERNELS / f"{op}.cu").is_file()
        launcher = (ROOT / "csrc" / "cuda" / f"{op}.cpp").read_text()
        assert re.search(rf'TORCH_LIBRARY_IMPL\(fastkd, CUDA, m\) {{ m\.impl\("{op}"', launcher)


@pytest.mark.slow
@pytest.mark.skipif(nvcc is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("op", sorted(ENTRIES))
def test_kernels_compile_with_nvcc_alone(op, arch, tmp_path):
    ptx = _kept_ptx(op, arch)
    if ptx is None:
        ptx = tmp_path / f"{op}.ptx"
        subprocess.run([nvcc, "-std=c++17", f"-I{ROOT / 'csrc'}", f"-I{KERNELS}", "-Werror", "all-warnings",
                        f"-arch={arch}", "-ptx", str(KERNELS / f"{op}.cu"), "-o", str(ptx)], check=True)
    text = ptx.read_text()
    assert len(re.findall(r"^\.entry ", text, re.M)) + len(re.findall(r"^\.visible \.entry ", text,
                                                                      re.M)) == ENTRIES[op]
    clustered = "barrier.cluster.wait" in text and "mapa." in text
    assert clustered == (op in CLUSTERED and arch == "sm_90a")


def _kept_ptx(op, arch):
    """The PTX that make cuda-check (nvcc -keep, every warning an error) left for this op and arch, if
    it is newer than the kernel and every header it may include; else None (compile it here)."""
    kept = ROOT / "build" / "cuda-check" / "keep" / f"{op}.compute_{arch.removeprefix('sm_')}.ptx"
    sources = [*KERNELS.iterdir(), *(ROOT / "csrc").glob("*_math.h")]
    if kept.is_file() and kept.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        return kept
    return None


needs_c = pytest.mark.skipif(not _ext.loaded(), reason="fastkd._C not built")
H100 = (9, 232448, 233472)  # compute capability major, shared memory per block (opt-in) and per SM
A100 = (8, 166912, 167936)


@needs_c
def test_plan_caches_the_row_on_chip_where_it_fits():
    plan = _ext._C.cuda_plan
    # a bf16 row of 32000 student + teacher logits is 125 KiB: one block on an A100; on an H100 two
    # blocks of a cluster, so two blocks share an SM; either way the inputs cross HBM once
    a100, h100 = plan("dense_kd", 32000, "bfloat16", *A100), plan("dense_kd", 32000, "bfloat16", *H100)
    assert (a100["cluster"], a100["reads"], a100["cache_bytes"]) == (1, 1, 32000 * 4)
    assert (h100["cluster"], h100["reads"], h100["cache_bytes"]) == (2, 1, 16000 * 4)
    # 128256 columns: a cluster of 8 on sm_90 stays single-pass; an A100 re-reads (two passes for
    # forward KL, three for the divergences whose gradient needs U first)
    big = plan("dense_kd", 128256, "bfloat16", *H100)
    assert (big["cluster"], big["reads"]) == (8, 1) and big["slice"] * 8 >= 128256 and big["slice"] % 8 == 0
    assert plan("dense_kd", 128256, "bfloat16", *A100)["reads"] == 2
    assert plan("dense_kd", 128256, "bfloat16", *A100, forward_kl=False)["reads"] == 3
    assert plan("dense_kd", 128256, "float64", *H100)["cache_bytes"] == 0  # 2 MiB a row: too big for 8 blocks
    # one thread block per row for the teacher ops; no cluster on sm_80
    assert plan("topk_teacher", 128256, "bfloat16", *H100)["cluster"] == 1
    assert plan("sparse_kd", 256000, "bfloat16", *A100)["cluster"] == 1
    for op in ("dense_kd", "sparse_kd", "topk_teacher", "sample_teacher_draws"):
        for vocab in (1, 333, 32000, 262144):
            p = plan(op, vocab, "float32", *H100)
            assert p["threads"] in (128, 256, 512) and p["slice"] * p["cluster"] >= vocab
            assert p["cache_bytes"] <= H100[1]


@needs_c
def test_plan_honours_a_forced_cluster_size(monkeypatch):
    monkeypatch.setenv("FASTKD_CUDA_CLUSTER", "1")
    assert _ext._C.cuda_plan("dense_kd", 128256, "bfloat16", *H100)["cluster"] == 1
    monkeypatch.setenv("FASTKD_CUDA_CLUSTER", "4")
    assert _ext._C.cuda_plan("dense_kd", 128256, "bfloat16", *H100)["cluster"] == 4


@needs_c
def test_docs_show_the_current_plans():
    from fastkd.cli.info import cuda_plan_table

    assert cuda_plan_table() in (ROOT / "docs" / "backends.md").read_text(), \
        "docs/backends.md's plan table is stale: paste `python -m fastkd info --cuda-plans`"
