"""csrc/kd_math.h and csrc/sparse_math.h are the one statement of the math for every backend: they
must compile as plain host C++ and, where nvcc is installed, as CUDA device code (no GPU needed)."""
import pathlib
import shutil
import subprocess

import pytest

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"
DIVS = ["ForwardKL", "ReverseKL", "JSD", "SkewForwardKL", "SkewReverseKL", "TVD"]

SOURCE = """
#include "kd_math.h"
#include "sparse_math.h"
#include <cmath>
{qual} double sparse_one(double a, double lp) {{
  const fastkd::SparseRow r{{0.5, -1.0, 0.2, -0.1, -2.0}};
  const fastkd::TailCoef c = fastkd::tail_coefficients(fastkd::Tail::Bucket, r);
  return fastkd::sparse_term(lp, a, c) + c.in_scale + fastkd::sparse_log_add(a, lp);
}}
template <fastkd::Divergence D>
{qual} float eval_one(float p, float q, fastkd::Mix<float> mix) {{
  float term, u, lp = std::log(p), lq = std::log(q);
  fastkd::Elem<D>::template eval<fastkd::ScalarOps<float>>(p, q, lp, lq, lp - lq, mix, term, u);
  return term + u + float(fastkd::row_weights(2.0, 0.1, true, 0.5).kd_grad_weight);
}}
{body}
"""


def _instantiations(qual):
    return "\n".join(f"template {qual} float eval_one<fastkd::Divergence::{d}>(float, float, fastkd::Mix<float>);"
                     for d in DIVS)


def test_host_compile(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "host.cpp"
    src.write_text(SOURCE.format(qual="", body=_instantiations("")))
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", "-I", str(CSRC), "-c", str(src), "-o",
                    str(tmp_path / "host.o")], check=True)


def test_device_compile(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    src = tmp_path / "device.cu"
    src.write_text(SOURCE.format(qual="__device__", body=_instantiations("__device__")))
    subprocess.run([nvcc, "-std=c++17", "-I", str(CSRC), "-c", str(src), "-o", str(tmp_path / "device.o")], check=True)


def test_row_columns_header_matches_the_ops_layouts():
    """csrc/row_columns.h names the vocab-parallel row tensors' columns as fastkd/_ops.py does, in its
    order, with the width last (the C++ kernels read them by these names)."""
    import re

    from fastkd import _ops

    text = (CSRC / "row_columns.h").read_text()
    for layout in ("DENSE_STATS", "DENSE_ROW", "SPARSE_STATS", "SPARSE_ROW"):
        found = re.search(rf"namespace {layout.lower()} {{[^\n]*\nenum : int {{ ([^}}]*) }};", text)
        assert found, f"csrc/row_columns.h has no enum for {layout}"
        names = [n.strip() for n in found.group(1).split(",")]
        assert names == list(getattr(_ops, layout)) + ["width"], (layout, names)
