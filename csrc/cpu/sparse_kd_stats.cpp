// CPU op fastkd::sparse_kd_stats (vocab-parallel step 1): argument checks, then the kernel for this
// ISA (sparse_kd_stats_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

at::Tensor sparse_kd_stats_cpu(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                               double temperature, bool hard) {
  SparseStatsArgs a;
  prepare_sparse_stats(a, student, indices, logprobs, temperature, hard);
  run_for_rows(a.student.size(0), FASTKD_ISA_KERNELS(sparse_kd_stats_rows), a);
  return a.out;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_kd_stats", &fastkd::cpu::sparse_kd_stats_cpu); }
