// CPU op fastkd::dense_kd: argument checks, then the kernel for this ISA (dense_kd_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {

namespace {

std::tuple<at::Tensor, at::Tensor> dense_kd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double temperature, double beta, int64_t ignore_index,
    double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad) {
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd::dense_kd: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "fastkd::dense_kd: student dtype ",
              student.scalar_type(), " != teacher dtype ", teacher.scalar_type());
  DenseArgs a;
  TORCH_CHECK(divergence_from_name(std::string_view(divergence.data(), divergence.size()),
                                   &a.divergence),
              "fastkd::dense_kd: unknown divergence '", divergence, "'");
  prepare_row_loss(a, "dense_kd", student, labels, temperature, ignore_index, hard_weight, scale_by_t2,
                   grad_scale, compute_grad);
  if (a.divergence == Divergence::JSD) {
    TORCH_CHECK(beta > 0 && beta < 1, "fastkd::dense_kd: beta must lie in (0, 1) for jsd, got ", beta);
  } else if (a.divergence == Divergence::SkewForwardKL || a.divergence == Divergence::SkewReverseKL) {
    TORCH_CHECK(beta >= 0 && beta < 1, "fastkd::dense_kd: beta must lie in [0, 1) for ", divergence, ", got ", beta);
  }
  a.teacher = teacher.contiguous();
  a.beta = beta;
  return run_row_loss(&isa_default::dense_kd_rows, &isa_avx2::dense_kd_rows, &isa_avx512::dense_kd_rows, a);
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dense_kd", &fastkd::cpu::dense_kd_cpu); }
