// Declarations shared by the CPU op (kd_loss_cpu.cpp) and its per-ISA kernels (kd_loss_kernel.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "../kd_math.h"

namespace fastkd::cpu {

// One call of the dense KD op, already validated. student/teacher: [N, V] contiguous, same dtype;
// labels: [N] int64 or undefined. Outputs: loss [N] (float, or double for double inputs) and,
// when compute_grad, grad [N, V] in the student's dtype; grad of an ignored row is zero.
struct DenseArgs {
  at::Tensor student, teacher, labels;
  at::Tensor loss, grad;
  Divergence divergence;
  double temperature, beta, hard_weight;
  int64_t ignore_index;
  bool scale_by_t2, compute_grad;
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

// An uninitialised tensor like `like`, whose pages the kernel will fault in as 2 MiB transparent
// huge pages where Linux allows it: first-touching a fresh [N, V] gradient in 4 KiB pages costs
// more than computing it (about 40 ms vs 8 ms for 131 MB here).
at::Tensor empty_hugepage_like(const at::Tensor& like);

// The kernels, one per instruction set; kd_loss_cpu.cpp picks one at run time.
namespace isa_default { void dense_kd_rows(const DenseArgs& a); }
namespace isa_avx2 { void dense_kd_rows(const DenseArgs& a); }
namespace isa_avx512 { void dense_kd_rows(const DenseArgs& a); }

}  // namespace fastkd::cpu
