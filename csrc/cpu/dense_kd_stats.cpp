// CPU op fastkd::dense_kd_stats (vocab-parallel step 1): argument checks, then the kernel for this
// ISA (dense_kd_stats_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

at::Tensor dense_kd_stats_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature, bool hard) {
  DenseStatsArgs a;
  prepare_dense_stats(a, student, teacher, temperature, hard);
  run_for_rows(a.student.size(0), FASTKD_ISA_KERNELS(dense_kd_stats_rows), a);
  return a.out;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dense_kd_stats", &fastkd::cpu::dense_kd_stats_cpu); }
