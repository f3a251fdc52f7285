// CPU op fastkd::dense_kd_finish (vocab-parallel step 3 for divergences that need U): argument
// checks, then the kernel for this ISA (dense_kd_finish_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

void dense_kd_finish_cpu(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& row_stats,
                         double temperature, double kd_grad_weight) {
  DenseFinishArgs a;
  prepare_dense_finish(a, grad, student, row_stats, temperature, kd_grad_weight);
  run_for_rows(a.student.size(0), FASTKD_ISA_KERNELS(dense_kd_finish_rows), a);
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dense_kd_finish", &fastkd::cpu::dense_kd_finish_cpu); }
