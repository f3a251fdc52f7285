// CPU op fastkd::dense_kd_shard (vocab-parallel steps 2-3): argument checks, then the kernel for
// this ISA (dense_kd_shard_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> dense_kd_shard_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    const at::Tensor& row_stats, c10::string_view divergence, double temperature, double beta, int64_t ignore_index,
    double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad) {
  DenseShardArgs a;
  prepare_dense_shard(a, student, teacher, labels, row_stats, std::string_view(divergence.data(), divergence.size()),
                      temperature, beta, ignore_index, hard_weight, scale_by_t2, grad_scale, compute_grad);
  run_for_rows(a.student.size(0), FASTKD_ISA_KERNELS(dense_kd_shard_rows), a);
  return {a.parts, a.grad};
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dense_kd_shard", &fastkd::cpu::dense_kd_shard_cpu); }
