// AVX-512 build of every CPU kernel; chosen at run time by cpu_isa() (kernels.h).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// GCC's target pragma enables the instructions but not the feature macros that ATen's and
// Sleef's headers test, so declare those too (this file only; the ISA is checked at run time).
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FASTKD_ISA_NS isa_avx512
#include "isa_kernels.h"
static_assert(at::vec::Vectorized<float>::size() == 16, "fastkd: AVX-512 build did not get 512-bit vectors");
