// CPU kernels of the dense KD op: argument checks, then the kernel for this machine's ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kd_loss_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd::cpu {

at::Tensor empty_hugepage_like(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + out.nbytes()) & ~(kHuge - 1);
  if (last > first) {  // advice only: failure (THP off) just means 4 KiB pages
    (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

void prepare_row_loss(RowLossArgs& a, const char* op, const at::Tensor& student,
                      const std::optional<at::Tensor>& labels, double temperature, int64_t ignore_index,
                      double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad) {
  TORCH_CHECK(student.dim() == 2, "fastkd::", op, ": student must be [N, V], got ", student.sizes());
  TORCH_CHECK(at::isFloatingType(student.scalar_type()),
              "fastkd::", op, ": logits must be floating point, got ", student.scalar_type());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "fastkd::", op, ": temperature must be positive and finite, got ", temperature);
  TORCH_CHECK(hard_weight >= 0 && hard_weight <= 1,
              "fastkd::", op, ": hard_weight must lie in [0, 1], got ", hard_weight);
  const int64_t N = student.size(0);
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == N && labels->scalar_type() == at::kLong,
                "fastkd::", op, ": labels must be int64 [", N, "], got ", labels->scalar_type(), " ",
                labels->sizes());
    a.labels = labels->contiguous();
  }
  TORCH_CHECK(hard_weight == 0 || labels.has_value(), "fastkd::", op, ": hard_weight > 0 needs labels");
  a.student = student.contiguous();
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.loss = at::empty({N}, student.options().dtype(acc));
  a.grad = compute_grad ? empty_hugepage_like(a.student) : at::empty({0}, student.options());
  a.temperature = temperature;
  a.hard_weight = hard_weight;
  a.grad_scale = grad_scale;
  a.ignore_index = ignore_index;
  a.scale_by_t2 = scale_by_t2;
  a.compute_grad = compute_grad;
}

namespace {

std::tuple<at::Tensor, at::Tensor> dense_kd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double temperature, double beta, int64_t ignore_index,
    double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad) {
  TORCH_CHECK(student.sizes() == teacher.sizes(), "fastkd::dense_kd: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " differ in shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "fastkd::dense_kd: student dtype ",
              student.scalar_type(), " != teacher dtype ", teacher.scalar_type());
  DenseArgs a;
  TORCH_CHECK(divergence_from_name(std::string_view(divergence.data(), divergence.size()),
                                   &a.divergence),
              "fastkd::dense_kd: unknown divergence '", divergence, "'");
  prepare_row_loss(a, "dense_kd", student, labels, temperature, ignore_index, hard_weight, scale_by_t2,
                   grad_scale, compute_grad);
  a.teacher = teacher.contiguous();
  a.beta = beta;
  return run_row_loss(&isa_default::dense_kd_rows, &isa_avx2::dense_kd_rows, &isa_avx512::dense_kd_rows, a);
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) { m.impl("dense_kd", &fastkd::cpu::dense_kd_cpu); }
