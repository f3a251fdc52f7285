// CPU op fastkd::sparse_kd: argument checks, then the kernel for this ISA (sparse_kd_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

constexpr float kLogprobSlack = 1e-3f;  // log-probs above this are not log-probs (raw logits?)

// What the kernel trusts, checked here (fastkd/_op_checks.py's sparse_values is the twin): the
// ids of real entries (logprob not -inf) in [0, V) and unique per row, log-probs and the tail's
// log-mass <= 0 to rounding.
void check_teacher_values(const at::Tensor& indices, const at::Tensor& logprobs, const at::Tensor& tail, int64_t V) {
  const int64_t N = indices.size(0), K = indices.size(1);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const float* lp = logprobs.const_data_ptr<float>();
  const float* tl = tail.const_data_ptr<float>();
  std::vector<int64_t> known;
  for (int64_t r = 0; r < N; ++r) {
    known.clear();
    for (int64_t c = 0; c < K; ++c) {
      const float v = lp[r * K + c];
      if (v == -INFINITY) continue;
      const int64_t id = idx[r * K + c];
      TORCH_CHECK_VALUE(id >= 0 && id < V, "fastkd::sparse_kd: indices must lie in [0, ", V, "); got ", id, " at row ", r);
      TORCH_CHECK_VALUE(!(v > kLogprobSlack), "fastkd::sparse_kd: logprobs must be log-probabilities (<= 0); row ", r,
                  " has ", v, " (raw logits?)");
      known.push_back(id);
    }
    TORCH_CHECK_VALUE(!(tl[r] > kLogprobSlack), "fastkd::sparse_kd: tail_logmass must be <= 0; row ", r, " has ", tl[r]);
    std::sort(known.begin(), known.end());
    const auto dup = std::adjacent_find(known.begin(), known.end());
    TORCH_CHECK_VALUE(dup == known.end(), "fastkd::sparse_kd: indices has a duplicate id ", (dup == known.end() ? 0 : *dup),
                " in row ", r);
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_cpu(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const at::Tensor& tail_logmass, const std::optional<at::Tensor>& labels, c10::string_view tail,
    double temperature, int64_t ignore_index, double hard_weight, bool scale_by_t2, double grad_scale,
    bool compute_grad) {
  SparseArgs a;
  prepare_sparse(a, student, indices, logprobs, tail_logmass, labels, std::string_view(tail.data(), tail.size()),
                 temperature, ignore_index, hard_weight, scale_by_t2, grad_scale, compute_grad);
  check_teacher_values(a.indices, a.logprobs, a.tail_logmass, student.size(1));
  return run_row_loss(FASTKD_ISA_KERNELS(sparse_kd_rows), a);
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_kd", &fastkd::cpu::sparse_kd_cpu); }
