// The CPU kernels' arguments and declarations, shared by the ops (<op>.cpp: argument checks,
// outputs) and their per-ISA kernels (<op>_kernel.h, compiled per ISA by isa_<isa>.cpp), and the
// choice of ISA at run time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <optional>
#include <tuple>
#include <string>

#include "../kd_math.h"
#include "../sparse_math.h"

namespace fastkd::cpu {

// What every row-loss op (dense_kd, sparse_kd) takes and returns, validated by prepare_row_loss.
// student: [N, V] contiguous; labels: [N] int64 or undefined. Outputs: loss [N] (float, or double
// for double inputs) and, when compute_grad, grad [N, V] in the student's dtype (zero at ignored
// rows), scaled by grad_scale; float for a Half student (fastkd/_math.py grad_dtype).
struct RowLossArgs {
  at::Tensor student, labels;
  at::Tensor loss, grad;
  double temperature, hard_weight, grad_scale;
  int64_t ignore_index;
  bool scale_by_t2, compute_grad;
};

// Checks the shared arguments of op `op` and fills `a`'s shared fields, outputs allocated.
void prepare_row_loss(RowLossArgs& a, const char* op, const at::Tensor& student,
                      const std::optional<at::Tensor>& labels, double temperature, int64_t ignore_index,
                      double hard_weight, bool scale_by_t2, double grad_scale, bool compute_grad);

// One call of the dense KD op: teacher [N, V] contiguous, the student's dtype.
struct DenseArgs : RowLossArgs {
  at::Tensor teacher;
  Divergence divergence;
  double beta;
};

// The instruction set the CPU kernels run with: the widest this CPU has, unless the environment
// variable FASTKD_CPU_ISA (avx512 | avx2 | default) asks for a narrower one.
enum class Isa { Default, Avx2, Avx512 };
inline Isa cpu_isa() {
  static const Isa isa = [] {
    Isa best = Isa::Default;
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = Isa::Avx512;
#endif
    const char* env = std::getenv("FASTKD_CPU_ISA");
    const std::string want = env ? env : "";
    if (want == "default") return Isa::Default;
    if (want == "avx2" && best != Isa::Default) return Isa::Avx2;
    return best;
  }();
  return isa;
}
inline const char* isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "default";
}

// An uninitialised contiguous tensor of `like`'s shape in `dtype`, whose pages the kernel will fault in as 2 MiB transparent
// huge pages where Linux allows it: first-touching a fresh [N, V] gradient in 4 KiB pages costs
// more than computing it (about 40 ms vs 8 ms for 131 MB here).
at::Tensor empty_hugepage_like(const at::Tensor& like, at::ScalarType dtype);

// One call of the sparse-teacher KD op: indices [N, k] int64; logprobs [N, k] float (-inf:
// padding); tail_logmass [N] float; tail: sparse_math.h.
struct SparseArgs : RowLossArgs {
  at::Tensor indices, logprobs, tail_logmass;
  Tail tail;
};

// Checks the logits [N, V] and temperature of a teacher compression op (topk_teacher, sample_teacher_draws).
void check_teacher_logits(const char* op, const at::Tensor& logits, double temperature);

// One call of topk_teacher: logits [N, V] contiguous; outputs indices [N, k] int64 (largest
// first), logprobs [N, k] float32, tail_logmass [N] float32.
struct TopkArgs {
  at::Tensor logits, indices, logprobs, tail_logmass;
  int64_t k;
  double temperature;
};

// One call of sample_teacher's draws: logits [N, V]; uniforms [N, S] float64, each row ascending
// in [0, 1); output draws [N, S] int64, ascending ids (-1 for a row with no finite logit).
struct SampleArgs {
  at::Tensor logits, uniforms, draws;
  double temperature;
};

// The kernels, one per instruction set (isa_*.cpp); the ops pick one with cpu_isa().
#define FASTKD_DECLARE_KERNELS(ns)              \
  namespace ns {                                \
  void dense_kd_rows(const DenseArgs& a);       \
  void sparse_kd_rows(const SparseArgs& a);     \
  void topk_teacher_rows(const TopkArgs& a);    \
  void sample_teacher_rows(const SampleArgs& a); \
  }
FASTKD_DECLARE_KERNELS(isa_default)
FASTKD_DECLARE_KERNELS(isa_avx2)
FASTKD_DECLARE_KERNELS(isa_avx512)
#undef FASTKD_DECLARE_KERNELS

// Calls ns::fn(args) for the ISA this machine runs.
template <typename Args>
void run_for_isa(void (*def)(const Args&), void (*avx2)(const Args&), void (*avx512)(const Args&),
                 const Args& args) {
  switch (cpu_isa()) {
    case Isa::Avx512: return avx512(args);
    case Isa::Avx2: return avx2(args);
    case Isa::Default: return def(args);
  }
}

// Runs a row-loss kernel (a loss of 0 for an empty batch or vocabulary) -> (loss, grad).
template <typename Args>
std::tuple<at::Tensor, at::Tensor> run_row_loss(void (*def)(const Args&), void (*avx2)(const Args&),
                                                void (*avx512)(const Args&), const Args& a) {
  if (a.student.size(0) > 0 && a.student.size(1) > 0) {
    run_for_isa(def, avx2, avx512, a);
  } else {
    a.loss.zero_();
  }
  return {a.loss, a.grad};
}

}  // namespace fastkd::cpu
