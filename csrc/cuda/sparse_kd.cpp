// CUDA op fastkd::sparse_kd: the shared argument checks (csrc/op_args.h), then
// kernels/sparse_kd.cu on the current stream. Values the CPU op checks on the host (ids in range
// and unique, log-probs <= 0) are checked by the kernel, which makes such a row NaN (no sync).
#include <torch/library.h>

#include "launchers.h"

namespace fastkd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_kd_cuda(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const at::Tensor& tail_logmass, const std::optional<at::Tensor>& labels, c10::string_view tail,
    double temperature, int64_t ignore_index, double hard_weight, bool scale_by_t2, double grad_scale,
    bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  SparseArgs a;
  prepare_sparse(a, student, indices, logprobs, tail_logmass, labels, std::string_view(tail.data(), tail.size()),
                 temperature, ignore_index, hard_weight, scale_by_t2, grad_scale, compute_grad);
  if (a.student.numel() == 0) {
    a.loss.zero_();
    return {a.loss, a.grad};
  }
  SparseParams p;
  fill_row_loss(p, a);
  p.indices = a.indices.const_data_ptr<int64_t>();
  p.logprobs = a.logprobs.const_data_ptr<float>();
  p.tail_logmass = a.tail_logmass.const_data_ptr<float>();
  p.k = a.indices.size(1);
  p.tail = a.tail;
  check_launch(sparse_kd(p, c10::cuda::getCurrentCUDAStream()), "sparse_kd");
  return {a.loss, a.grad};
}

}  // namespace
}  // namespace fastkd::cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("sparse_kd", &fastkd::cuda::sparse_kd_cuda); }
