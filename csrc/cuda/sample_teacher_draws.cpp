// CUDA op fastkd::sample_teacher_draws: the shared argument checks (csrc/op_args.h), then
// kernels/sample_teacher_draws.cu on the current stream. The uniforms are trusted to lie in [0, 1)
// and ascend per row (fastkd.sample_teacher draws and sorts them); reading them back to check
// would synchronise the stream.
#include <torch/library.h>

#include "launchers.h"

namespace fastkd::cuda {
namespace {

at::Tensor sample_teacher_draws_cuda(const at::Tensor& logits, const at::Tensor& uniforms, double temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  SampleArgs a;
  prepare_sample(a, logits, uniforms, temperature);
  if (a.logits.size(0) == 0 || a.logits.size(1) == 0 || a.uniforms.size(1) == 0) return a.draws.fill_(-1);
  SampleParams p;
  p.logits = a.logits.const_data_ptr();
  p.stride = a.logits.stride(0);
  p.n = a.logits.size(0);
  p.vocab = a.logits.size(1);
  p.s = a.uniforms.size(1);
  p.inv_temperature = 1.0 / temperature;
  p.dtype = dtype_of(a.logits.scalar_type());
  p.uniforms = a.uniforms.const_data_ptr<double>();
  p.draws = a.draws.mutable_data_ptr<int64_t>();
  check_launch(sample_teacher_draws(p, c10::cuda::getCurrentCUDAStream()), "sample_teacher_draws");
  return a.draws;
}

}  // namespace
}  // namespace fastkd::cuda

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) { m.impl("sample_teacher_draws", &fastkd::cuda::sample_teacher_draws_cuda); }
