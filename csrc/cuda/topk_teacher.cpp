// CUDA op fastkd::topk_teacher: the shared argument checks (csrc/op_args.h), then
// kernels/topk_teacher.cu on the current stream.
#include <torch/library.h>

#include "launchers.h"

namespace fastkd::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_teacher_cuda(const at::Tensor& logits, int64_t k,
                                                                 double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TopkArgs a;
  prepare_topk(a, logits, k, temperature);
  TORCH_CHECK_VALUE(k <= kMaxTopk, "fastkd::topk_teacher: backend 'cuda' keeps at most k=", kMaxTopk,
              " entries per row, got k=", k, "; use backend='torch' for more");
  TopkParams p;
  p.logits = a.logits.const_data_ptr();
  p.stride = a.logits.stride(0);
  p.n = a.logits.size(0);
  p.vocab = a.logits.size(1);
  p.k = k;
  p.inv_temperature = 1.0 / temperature;
  p.dtype = dtype_of(a.logits.scalar_type());
  p.indices = a.indices.mutable_data_ptr<int64_t>();
  p.logprobs = a.logprobs.mutable_data_ptr<float>();
  p.tail_logmass = a.tail_logmass.mutable_data_ptr<float>();
  check_launch(topk_teacher(p, c10::cuda::getCurrentCUDAStream()), "topk_teacher");
  return {a.indices, a.logprobs, a.tail_logmass};
}

}  // namespace
}  // namespace fastkd::cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("topk_teacher", &fastkd::cuda::topk_teacher_cuda); }
