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
  DenseArgs a;
  prepare_dense(a, student, teacher, labels, std::string_view(divergence.data(), divergence.size()), temperature,
                beta, ignore_index, hard_weight, scale_by_t2, grad_scale, compute_grad);
  return run_row_loss(FASTKD_ISA_KERNELS(dense_kd_rows), a);
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dense_kd", &fastkd::cpu::dense_kd_cpu); }
