// CPU op fastkd::sparse_kd: argument checks, then the kernel for this ISA (sparse_kd_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_kd_cpu(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const at::Tensor& tail_logmass, const std::optional<at::Tensor>& labels, c10::string_view tail,
    double temperature, int64_t ignore_index, double hard_weight, bool scale_by_t2, double grad_scale,
    bool compute_grad) {
  SparseArgs a;
  prepare_row_loss(a, "sparse_kd", student, labels, temperature, ignore_index, hard_weight, scale_by_t2,
                   grad_scale, compute_grad);
  const int64_t N = student.size(0);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == N && logprobs.sizes() == indices.sizes(),
              "fastkd::sparse_kd: indices and logprobs must be [", N, ", k]; got ", indices.sizes(),
              " and ", logprobs.sizes());
  TORCH_CHECK(tail_logmass.dim() == 1 && tail_logmass.size(0) == N,
              "fastkd::sparse_kd: tail_logmass must be [", N, "], got ", tail_logmass.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && logprobs.scalar_type() == at::kFloat &&
                  tail_logmass.scalar_type() == at::kFloat,
              "fastkd::sparse_kd: indices must be int64, logprobs and tail_logmass float32");
  TORCH_CHECK(tail_from_name(std::string_view(tail.data(), tail.size()), &a.tail),
              "fastkd::sparse_kd: unknown tail '", tail, "'");
  a.indices = indices.contiguous();
  a.logprobs = logprobs.contiguous();
  a.tail_logmass = tail_logmass.contiguous();
  return run_row_loss(&isa_default::sparse_kd_rows, &isa_avx2::sparse_kd_rows, &isa_avx512::sparse_kd_rows, a);
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_kd", &fastkd::cpu::sparse_kd_cpu); }
