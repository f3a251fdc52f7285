// CPU kernels of the sparse-teacher compression ops (topk_teacher, sample_teacher_draws):
// argument checks, then the kernel for this ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kd_loss_cpu.h"

namespace fastkd::cpu {
namespace {

void check_logits(const char* op, const at::Tensor& logits, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "fastkd::", op, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "fastkd::", op, ": logits must be floating point");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "fastkd::", op, ": temperature must be positive and finite, got ", temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_teacher_cpu(const at::Tensor& logits, int64_t k,
                                                                double temperature) {
  check_logits("topk_teacher", logits, temperature);
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "fastkd::topk_teacher: k must lie in [1, V=", V, "], got ", k);
  TopkArgs a;
  a.logits = logits.contiguous();
  a.indices = at::empty({N, k}, logits.options().dtype(at::kLong));
  a.logprobs = at::empty({N, k}, logits.options().dtype(at::kFloat));
  a.tail_logmass = at::empty({N}, logits.options().dtype(at::kFloat));
  a.k = k;
  a.temperature = temperature;
  if (N > 0) run_for_isa(&isa_default::topk_teacher_rows, &isa_avx2::topk_teacher_rows,
                         &isa_avx512::topk_teacher_rows, a);
  return {a.indices, a.logprobs, a.tail_logmass};
}

at::Tensor sample_teacher_draws_cpu(const at::Tensor& logits, const at::Tensor& uniforms, double temperature) {
  check_logits("sample_teacher_draws", logits, temperature);
  const int64_t N = logits.size(0);
  TORCH_CHECK(uniforms.dim() == 2 && uniforms.size(0) == N && uniforms.scalar_type() == at::kDouble,
              "fastkd::sample_teacher_draws: uniforms must be float64 [", N, ", S], got ",
              uniforms.scalar_type(), " ", uniforms.sizes());
  SampleArgs a;
  a.logits = logits.contiguous();
  a.uniforms = uniforms.contiguous();
  a.draws = at::empty(uniforms.sizes(), logits.options().dtype(at::kLong));
  a.temperature = temperature;
  if (N > 0 && logits.size(1) > 0 && uniforms.size(1) > 0)
    run_for_isa(&isa_default::sample_teacher_rows, &isa_avx2::sample_teacher_rows,
                &isa_avx512::sample_teacher_rows, a);
  else
    a.draws.fill_(-1);
  return a.draws;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("topk_teacher", &fastkd::cpu::topk_teacher_cpu);
  m.impl("sample_teacher_draws", &fastkd::cpu::sample_teacher_draws_cpu);
}
