// CPU kernels of the sparse-teacher KD op: argument checks, then the kernel for this ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kd_loss_cpu.h"

namespace fastkd::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_kd_cpu(
    const at::Tensor& student, const at::Tensor& indices, const at::Tensor& logprobs,
    const at::Tensor& tail_logmass, const std::optional<at::Tensor>& labels, c10::string_view tail,
    double temperature, int64_t ignore_index, double hard_weight, bool scale_by_t2, double grad_scale,
    bool compute_grad) {
  TORCH_CHECK(student.dim() == 2, "fastkd::sparse_kd: student must be [N, V], got ", student.sizes());
  const int64_t N = student.size(0);
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == N && logprobs.sizes() == indices.sizes(),
              "fastkd::sparse_kd: indices and logprobs must be [", N, ", k]; got ", indices.sizes(),
              " and ", logprobs.sizes());
  TORCH_CHECK(tail_logmass.dim() == 1 && tail_logmass.size(0) == N,
              "fastkd::sparse_kd: tail_logmass must be [", N, "], got ", tail_logmass.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong && logprobs.scalar_type() == at::kFloat &&
                  tail_logmass.scalar_type() == at::kFloat,
              "fastkd::sparse_kd: indices must be int64, logprobs and tail_logmass float32");
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "fastkd::sparse_kd: logits must be floating point");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "fastkd::sparse_kd: temperature must be positive and finite, got ", temperature);
  SparseArgs a;
  const std::string_view t(tail.data(), tail.size());
  if (t == "bucket") a.tail = Tail::Bucket;
  else if (t == "renorm_teacher") a.tail = Tail::RenormTeacher;
  else if (t == "renorm_both") a.tail = Tail::RenormBoth;
  else TORCH_CHECK(false, "fastkd::sparse_kd: unknown tail '", tail, "'");
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == N && labels->scalar_type() == at::kLong,
                "fastkd::sparse_kd: labels must be int64 [", N, "]");
    a.labels = labels->contiguous();
  }
  TORCH_CHECK(hard_weight == 0 || labels.has_value(), "fastkd::sparse_kd: hard_weight > 0 needs labels");
  a.student = student.contiguous();
  a.indices = indices.contiguous();
  a.logprobs = logprobs.contiguous();
  a.tail_logmass = tail_logmass.contiguous();
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.loss = at::empty({N}, student.options().dtype(acc));
  a.grad = compute_grad ? empty_hugepage_like(a.student) : at::empty({0}, student.options());
  a.temperature = temperature;
  a.hard_weight = hard_weight;
  a.grad_scale = grad_scale;
  a.ignore_index = ignore_index;
  a.scale_by_t2 = scale_by_t2;
  a.compute_grad = compute_grad;
  if (N > 0 && student.size(1) > 0) {
    run_for_isa(&isa_default::sparse_kd_rows, &isa_avx2::sparse_kd_rows, &isa_avx512::sparse_kd_rows, a);
  } else {
    a.loss.zero_();
  }
  return {a.loss, a.grad};
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("sparse_kd", &fastkd::cpu::sparse_kd_cpu); }
