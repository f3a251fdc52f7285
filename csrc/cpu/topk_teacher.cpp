// CPU op fastkd::topk_teacher: argument checks, then the kernel for this ISA (topk_teacher_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_teacher_cpu(const at::Tensor& logits, int64_t k,
                                                                double temperature) {
  check_teacher_logits("topk_teacher", logits, temperature);
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

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("topk_teacher", &fastkd::cpu::topk_teacher_cpu); }
