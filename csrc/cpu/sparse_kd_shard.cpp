// CPU op fastkd::sparse_kd_shard (vocab-parallel step 3): argument checks, then the kernel for this
// ISA (sparse_kd_shard_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

at::Tensor sparse_kd_shard_cpu(const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
                               const std::optional<at::Tensor>& labels, const at::Tensor& row_stats, double temperature,
                               int64_t ignore_index, double hard_weight, bool scale_by_t2, double grad_scale) {
  SparseShardArgs a;
  prepare_sparse_shard(a, student, indices, logprobs, labels, row_stats, temperature, ignore_index, hard_weight,
                       scale_by_t2, grad_scale);
  run_for_rows(a.student.size(0), FASTKD_ISA_KERNELS(sparse_kd_shard_rows), a);
  return a.grad;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_kd_shard", &fastkd::cpu::sparse_kd_shard_cpu); }
