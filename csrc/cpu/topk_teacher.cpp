// CPU op fastkd::topk_teacher: argument checks, then the kernel for this ISA (topk_teacher_kernel.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace fastkd::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_teacher_cpu(const at::Tensor& logits, int64_t k,
                                                                double temperature) {
  TopkArgs a;
  prepare_topk(a, logits, k, temperature);
  run_for_rows(logits.size(0), FASTKD_ISA_KERNELS(topk_teacher_rows), a);
  return {a.indices, a.logprobs, a.tail_logmass};
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("topk_teacher", &fastkd::cpu::topk_teacher_cpu); }
