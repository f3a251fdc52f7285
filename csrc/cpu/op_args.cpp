// Argument checks and output allocation shared by the CPU ops (declared in kernels.h).
#include <ATen/ATen.h>

#include "kernels.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd::cpu {

at::Tensor empty_hugepage_like(const at::Tensor& like, at::ScalarType dtype) {
  at::Tensor out = at::empty(like.sizes(), like.options().dtype(dtype));
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
  // the kept gradient: the student's dtype, float for Half (fastkd/_math.py grad_dtype)
  const auto grad_type = student.scalar_type() == at::kHalf ? at::kFloat : student.scalar_type();
  a.grad = compute_grad ? empty_hugepage_like(a.student, grad_type) : at::empty({0}, student.options());
  a.temperature = temperature;
  a.hard_weight = hard_weight;
  a.grad_scale = grad_scale;
  a.ignore_index = ignore_index;
  a.scale_by_t2 = scale_by_t2;
  a.compute_grad = compute_grad;
}

void check_teacher_logits(const char* op, const at::Tensor& logits, double temperature) {
  TORCH_CHECK(logits.dim() == 2, "fastkd::", op, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "fastkd::", op, ": logits must be floating point");
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature),
              "fastkd::", op, ": temperature must be positive and finite, got ", temperature);
}

}  // namespace fastkd::cpu
