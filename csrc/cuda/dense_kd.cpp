// CUDA op fastkd::dense_kd: the shared argument checks (csrc/op_args.h), then kernels/dense_kd.cu
// on the current stream.
#include <torch/library.h>

#include "launchers.h"

namespace fastkd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> dense_kd_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double temperature, double beta, int64_t ignore_index,
    double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(student.device());
  DenseArgs a;
  prepare_dense(a, student, teacher, labels, std::string_view(divergence.data(), divergence.size()), temperature,
                beta, ignore_index, hard_weight, scale_by_t2, grad_scale, compute_grad);
  if (a.student.numel() == 0) {  // no rows, or rows of no columns: loss 0
    a.loss.zero_();
    return {a.loss, a.grad};
  }
  DenseParams p;
  fill_row_loss(p, a);
  p.teacher = a.teacher.const_data_ptr();
  p.stride_t = a.teacher.stride(0);
  p.divergence = a.divergence;
  p.beta = beta;
  check_launch(dense_kd(p, c10::cuda::getCurrentCUDAStream()), "dense_kd");
  return {a.loss, a.grad};
}

}  // namespace
}  // namespace fastkd::cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("dense_kd", &fastkd::cuda::dense_kd_cuda); }
