"""The CUDA backend's kernels -- the very source of kernels/*.cu -- run on the CPU, in an emulation
of the CUDA execution model (tests/cuda_emu/include/cuda_emu.h: a block's threads are threads,
__syncthreads a barrier, warp shuffles exchanges, shared memory shared), against backend "torch" on
the dispatch table's samples (tests/samples.py) with test_dispatch.py's checks. Each sample runs
twice: on an emulated device with an A100's shared memory (rows cached on chip, one read) and on
one with almost none (rows re-read by every pass); and the row-loss samples once more on an
emulated sm_90 device with each row split over a thread-block cluster of 2, 4 and 8 blocks that
reduce through (emulated) distributed shared memory. What it cannot show: a real GPU's memory
model and timing -- `make gpu-check` is for those."""
import ctypes
import math
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from fastkd import _math, _ops
from fastkd._math import TAILS
from samples import DTYPES, SAMPLES
from test_dispatch import _check, _op

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
OPS = ("dense_kd", "sparse_kd", "topk_teacher", "sample_teacher_draws")
CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
DEVICES = {"cached": 0, "uncached": 1}  # emulated: an A100's shared memory, and almost none
H100 = 2  # emulated: compute capability 9, an H100's shared memory (plans may use clusters)
I64, F64, INT, PTR = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p

pytestmark = pytest.mark.slow  # (g++ builds the emulation of every CUDA kernel)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("cuda_emu")
    sources = []
    for op in OPS:  # dynamic shared memory becomes the emulated block's buffer
        text = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = emu_dynamic_smem<\1>();",
                      (ROOT / "kernels" / f"{op}.cu").read_text())
        assert "emu_dynamic_smem" in text, f"kernels/{op}.cu: no dynamic shared memory found to emulate"
        (out / f"{op}.cpp").write_text(text)
        sources.append(str(out / f"{op}.cpp"))
    subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", f"-I{EMU / 'include'}",
                    f"-I{ROOT / 'kernels'}", f"-I{ROOT / 'csrc'}", *sources, str(EMU / "driver.cpp"),
                    "-o", str(out / "emu.so")], check=True)
    lib = ctypes.CDLL(str(out / "emu.so"))
    lib.emu_dense_kd.argtypes = [PTR, PTR, PTR, PTR, PTR, I64, I64, INT, INT, F64, F64, I64, F64, INT, F64]
    lib.emu_sparse_kd.argtypes = [PTR, PTR, PTR, PTR, PTR, PTR, PTR, I64, I64, I64, INT, INT, F64, I64, F64, INT, F64]
    lib.emu_topk_teacher.argtypes = [PTR, PTR, PTR, PTR, I64, I64, I64, INT, F64]
    lib.emu_sample_teacher_draws.argtypes = [PTR, PTR, PTR, I64, I64, I64, INT, F64]
    lib.emu_clustered_blocks.restype = lib.emu_smem_overruns.restype = ctypes.c_ulong
    return lib


def _p(t):
    return None if t is None else t.data_ptr()


class Guarded:
    """Outputs with 64 elements of sentinel on each side: a kernel's write outside its output shows
    (with the emulator's canary after each block's dynamic shared memory, a memcheck of writes)."""

    GUARD = 64

    def __init__(self):
        self.buffers = []

    def empty(self, shape, dtype):
        n = math.prod(shape)
        buf = torch.full((n + 2 * self.GUARD,), -7 if dtype == torch.long else 1234.5, dtype=dtype)
        self.buffers.append((buf, buf[0].clone(), n))
        return buf[self.GUARD:self.GUARD + n].view(shape)

    def check(self):
        for buf, sentinel, n in self.buffers:
            assert (buf[:self.GUARD] == sentinel).all() and (buf[self.GUARD + n:] == sentinel).all(), \
                "a kernel wrote outside its output"


def run(lib, device, op, *args):
    """`op` on the emulated CUDA kernels, with the schema's positional arguments (like the launcher);
    fails when a kernel wrote outside its outputs or its shared memory."""
    lib.emu_set_device(DEVICES.get(device, device))
    guard, overruns = Guarded(), lib.emu_smem_overruns()
    out = _run(lib, guard, op, *args)
    guard.check()
    assert lib.emu_smem_overruns() == overruns, "a kernel wrote past its dynamic shared memory"
    return out


def _run(lib, guard, op, *args):
    if op in ("dense_kd", "sparse_kd"):
        student = args[0].contiguous()
        loss, grad = _ops.row_loss_outputs(student, args[-1])
        if student.numel() == 0:
            return loss.zero_(), grad
        loss = guard.empty(loss.shape, loss.dtype)
        if args[-1]:
            grad = guard.empty(grad.shape, grad.dtype)
        n, v = student.shape
        g = grad if args[-1] else None
        if op == "dense_kd":
            s, t, labels, div, temp, beta, ignore, hard, t2, scale, _ = args
            rc = lib.emu_dense_kd(_p(student), _p(t.contiguous()), _p(labels), _p(loss), _p(g), n, v, CODES[s.dtype],
                                  _math.DIVERGENCES.index(div), temp, beta, ignore, hard, int(t2), scale)
        else:
            s, idx, lp, tail, labels, mode, temp, ignore, hard, t2, scale, _ = args
            rc = lib.emu_sparse_kd(_p(student), _p(idx.contiguous()), _p(lp.contiguous()), _p(tail.contiguous()),
                                   _p(labels), _p(loss), _p(g), n, v, idx.shape[1], CODES[s.dtype], TAILS.index(mode),
                                   temp, ignore, hard, int(t2), scale)
        assert rc == 0
        return loss, grad
    x = args[0].contiguous()
    n, v = x.shape
    if op == "topk_teacher":
        k, temp = args[1:]
        out = (guard.empty((n, k), torch.long), guard.empty((n, k), torch.float32), guard.empty((n,), torch.float32))
        assert lib.emu_topk_teacher(_p(x), *map(_p, out), n, v, k, CODES[x.dtype], temp) == 0
        return out
    u, temp = args[1].contiguous(), args[2]
    draws = guard.empty(tuple(u.shape), torch.long)
    assert lib.emu_sample_teacher_draws(_p(x), _p(u), _p(draws), n, v, u.shape[1], CODES[x.dtype], temp) == 0
    return draws


def _cases():
    out = []
    for op in OPS:
        for dtype in DTYPES:
            for name, args in SAMPLES[op](dtype):
                for device in DEVICES:
                    out.append(pytest.param(op, device, args, id=f"{op}-{str(dtype)[6:]}-{name}-{device}"))
    return out


@pytest.mark.parametrize("op, device, args", _cases())
def test_emulated_kernels_match_the_reference(emu, op, device, args):
    _check(op, run(emu, device, op, *args), _op(op, "torch")(*args), args)


@pytest.mark.parametrize("device", DEVICES)
def test_emulated_kernels_make_untrusted_rows_nan(emu, device):
    """What the CPU ops check on the host, the CUDA kernels turn into NaN rows, with no sync: a NaN
    logit, a kept label outside [0, V); for a sparse teacher a repeated id, an id outside [0, V), a
    log-prob above 0. The other rows are untouched."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 70, generator=g), torch.randn(5, 70, generator=g)
    s[1, 7] = float("nan")
    labels = torch.tensor([3, 4, 70, -100, 5])
    loss, grad = run(emu, device, "dense_kd", s, t, labels, "jsd", 2.0, 0.5, -100, 0.3, True, 1.0, True)
    assert loss[[1, 2]].isnan().all() and grad[[1, 2]].isnan().all()
    assert loss[3] == 0 and (grad[3] == 0).all()
    want, want_g = _op("dense_kd", "torch")(s[[0, 4]], t[[0, 4]], labels[[0, 4]], "jsd", 2.0, 0.5, -100, 0.3, True,
                                            1.0, True)
    torch.testing.assert_close(loss[[0, 4]], want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad[[0, 4]], want_g, rtol=1e-5, atol=1e-6)
    idx = torch.tensor([[1, 2, 3]] * 5)
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]] * 5))
    idx[1, 2], idx[2, 1], lp[3, 0] = 1, 70, 0.5  # repeated id, id outside [0, V), not a log-prob
    tail = torch.full((5,), float(torch.log(torch.tensor(0.1))))
    s[1, 7] = 0.0
    loss, grad = run(emu, device, "sparse_kd", s, idx, lp, tail, None, "bucket", 2.0, -100, 0.0, True, 1.0, True)
    assert loss[1:4].isnan().all() and grad[1:4].isnan().all()
    assert not loss[[0, 4]].isnan().any() and not grad[[0, 4]].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab, dtype", [(9000, torch.bfloat16), (9001, torch.float32), (4099, torch.float16)])
def test_emulated_kernels_on_long_rows(emu, device, vocab, dtype):
    """Rows of thousands of columns: 512 threads a block, many vectors a thread, and (odd V) rows
    that are not 16-byte aligned, read one column at a time."""
    _long_rows(emu, device, vocab, dtype)


def test_emulated_h100_splits_a_long_row_over_a_cluster(emu):
    """On sm_90 the plan itself splits a 30000-column bf16 row over 2 blocks (two blocks an SM)."""
    before = emu.emu_clustered_blocks()
    _long_rows(emu, H100, 30000, torch.bfloat16)
    assert emu.emu_clustered_blocks() - before == 3 * 2 * 3  # dense_kd: 3 rows x 2 blocks, 3 divergences


def _long_rows(emu, device, vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    s, t = [(torch.randn(3, vocab, generator=g) * 3).to(dtype) for _ in range(2)]
    labels = torch.tensor([5, -100, vocab - 1])
    for div in ("forward_kl", "jsd", "tvd"):
        args = (s, t, labels, div, 2.0, 0.5, -100, 0.2, True, 1.0, True)
        _check("dense_kd", run(emu, device, "dense_kd", *args), _op("dense_kd", "torch")(*args), args)
    teacher = _op("topk_teacher", "torch")(t, 64, 2.0)
    args = (t, 64, 2.0)
    _check("topk_teacher", run(emu, device, "topk_teacher", *args), teacher, args)
    for tail in TAILS:
        args = (s, *teacher, labels, tail, 2.0, -100, 0.2, False, 0.5, True)
        _check("sparse_kd", run(emu, device, "sparse_kd", *args), _op("sparse_kd", "torch")(*args), args)
    u = torch.rand(3, 16, dtype=torch.float64, generator=g).sort(-1).values
    args = (t, u, 2.0)
    _check("sample_teacher_draws", run(emu, device, "sample_teacher_draws", *args), _op("sample_teacher_draws",
                                                                                        "torch")(*args), args)


def _cluster_cases():
    out = []
    for op in ("dense_kd", "sparse_kd"):
        for dtype in (torch.float32, torch.bfloat16):
            for name, args in SAMPLES[op](dtype):
                for cluster in ("2", "4", "8"):
                    out.append(pytest.param(op, cluster, args, id=f"{op}-{str(dtype)[6:]}-{name}-cluster{cluster}"))
    return out


@pytest.mark.parametrize("op, cluster, args", _cluster_cases())
def test_emulated_clusters_match_the_reference(emu, monkeypatch, op, cluster, args):
    """sm_90's path: each row split over a cluster of blocks, each caching its slice, the row's
    statistics and sums combined through distributed shared memory (map_shared_rank)."""
    monkeypatch.setenv("FASTKD_CUDA_CLUSTER", cluster)
    before = emu.emu_clustered_blocks()
    _check(op, run(emu, H100, op, *args), _op(op, "torch")(*args), args)
    rows = args[0].shape[0] if args[0].numel() else 0
    assert emu.emu_clustered_blocks() - before == rows * int(cluster)  # the rows ran as clusters


@pytest.mark.parametrize("device", DEVICES)
def test_emulated_kernels_nan_gradient_under_a_teacher_mask(emu, device):
    """docs/math.md's rule in the CUDA kernels: reverse KL where the teacher masks an id the student
    gives mass is +inf with an all-NaN gradient row; the other rows match the reference."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 70, generator=g), torch.randn(3, 70, generator=g)
    t[0, 5] = float("-inf")
    args = (s, t, torch.tensor([1, 2, 3]), "reverse_kl", 2.0, 0.5, -100, 0.3, True, 1.0, True)
    loss, grad = run(emu, device, "dense_kd", *args)
    assert loss[0] == float("inf") and grad[0].isnan().all()
    want, want_g = _op("dense_kd", "torch")(*args)
    assert want[0] == float("inf") and want_g[0].isnan().all()
    torch.testing.assert_close(loss[1:], want[1:], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad[1:], want_g[1:], rtol=1e-5, atol=1e-6)
