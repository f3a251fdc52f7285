// The sampled-teacher draw kernel for the CPU (fastkd.sample_teacher; the torch twin is
// fastkd/reference/sample_teacher_draws.py). Included once per ISA by isa_<isa>.cpp.
//
// Per row: load + scale + max, the exp pass, then one walk of the running sum that places the
// row's sorted uniforms u * Z (inverse CDF); the draws come out in ascending id order.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {

template <typename scalar_t>
void sample_rows(const SampleArgs& a) {
  using Vec = at::vec::Vectorized<float>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t N = a.logits.size(0), V = a.logits.size(1), S = a.uniforms.size(1);
  const int64_t Vp = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  const scalar_t* T = a.logits.const_data_ptr<scalar_t>();
  const double* U = a.uniforms.const_data_ptr<double>();
  int64_t* OUT = a.draws.mutable_data_ptr<int64_t>();
  const float inv_t = float(1.0 / a.temperature);

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> row(Vp);
    float* A = row.data;
    for (int64_t r = begin; r < end; ++r) {
      const double* u = U + r * S;  // ascending, in [0, 1)
      int64_t* out = OUT + r * S;
      const float m = load_scaled(T + r * V, A, V, Vp, inv_t);
      if (m == kNegInf) {  // nothing to draw: -1 marks the row empty
        for (int64_t c = 0; c < S; ++c) out[c] = -1;
        continue;
      }
      const double z = exp_sum(A, A, Vp, m);
      int64_t c = 0, last = 0;
      double run = 0;
      for (int64_t j = 0; j < V && c < S; ++j) {
        if (A[j] == 0) continue;
        run += A[j];
        last = j;
        while (c < S && u[c] * z < run) out[c++] = j;
      }
      for (; c < S; ++c) out[c] = last;  // u * z at the very top, lost to rounding
    }
  });
}

}  // namespace

FASTKD_DEFINE_KERNEL(sample_teacher_rows, SampleArgs, logits, sample_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
