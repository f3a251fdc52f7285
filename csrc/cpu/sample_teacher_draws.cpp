// CPU op fastkd::sample_teacher_draws: argument checks, then the kernel for this ISA
// (sample_teacher_draws_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

at::Tensor sample_teacher_draws_cpu(const at::Tensor& logits, const at::Tensor& uniforms, double temperature) {
  SampleArgs a;
  prepare_sample(a, logits, uniforms, temperature);
  const int64_t N = logits.size(0);
  const double* u = a.uniforms.const_data_ptr<double>();
  const int64_t S = uniforms.size(1);
  for (int64_t i = 0; i < a.uniforms.numel(); ++i) {  // the kernel's walk trusts both
    TORCH_CHECK_VALUE(u[i] >= 0 && u[i] < 1, "fastkd::sample_teacher_draws: uniforms must lie in [0, 1), got ", u[i]);
    TORCH_CHECK_VALUE(i % S == 0 || u[i] >= u[i - 1], "fastkd::sample_teacher_draws: uniforms must ascend along each row");
  }
  if (N > 0 && logits.size(1) > 0 && uniforms.size(1) > 0)
    run_for_isa(FASTKD_ISA_KERNELS(sample_teacher_rows), a);
  else
    a.draws.fill_(-1);
  return a.draws;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sample_teacher_draws", &fastkd::cpu::sample_teacher_draws_cpu); }
