// The CPU kernels' declarations, shared by the ops (<op>.cpp: the value checks, then the kernel)
// and their per-ISA kernels (<op>_kernel.h, compiled per ISA by isa_<isa>.cpp), and the choice of
// ISA at run time. The argument structs and their checks are csrc/op_args.h, shared with CUDA.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <optional>
#include <tuple>
#include <string>

#include "../op_args.h"
#include "isa_kernels.h"

namespace fastkd::cpu {

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

// The kernels, one per instruction set (isa_*.cpp); the ops pick one with cpu_isa().
// (the list: isa_kernels.h)
#define FASTKD_DECLARE_KERNEL(fn, Args) void fn(const Args& a);
namespace isa_default { FASTKD_CPU_KERNELS(FASTKD_DECLARE_KERNEL) }
namespace isa_avx2 { FASTKD_CPU_KERNELS(FASTKD_DECLARE_KERNEL) }
namespace isa_avx512 { FASTKD_CPU_KERNELS(FASTKD_DECLARE_KERNEL) }
#undef FASTKD_DECLARE_KERNEL

// The three ISA builds of kernel `fn`, as run_for_isa and run_row_loss take them.
#define FASTKD_ISA_KERNELS(fn) &::fastkd::cpu::isa_default::fn, &::fastkd::cpu::isa_avx2::fn, \
                               &::fastkd::cpu::isa_avx512::fn

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

// Calls the kernel for this machine's ISA when there is a row to run (an empty batch: nothing to do).
template <typename Args>
void run_for_rows(int64_t rows, void (*def)(const Args&), void (*avx2)(const Args&), void (*avx512)(const Args&),
                  const Args& args) {
  if (rows > 0) run_for_isa(def, avx2, avx512, args);
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
