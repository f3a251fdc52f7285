// The vocab-parallel dense loss's first kernel on the CPU (fastkd.distributed, step 1): per row
// of one rank's slice [N, V_slice], the maxima and sums of exponentials of a = s/T, b = t/T and
// s (temperature 1, for hard labels), and the close-row sum's share r = sum_j e_j expm1(b_j - a_j)
// (e = exp(a - max a)) with its far flag -- fastkd/_ops.py's DENSE_STATS, the math of
// fastkd/reference/dense_kd_stats.py. The passes are dense_kd_kernel.h's 1-3a, on the slice.
// Included per ISA by isa_<isa>.cpp (FASTKD_ISA_NS, CPU_CAPABILITY set).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "../row_columns.h"
#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {
namespace DS = ::fastkd::columns::dense_stats;

template <typename scalar_t>
void dense_stats_rows(const DenseStatsArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t N = a.student.size(0), V = a.student.size(1);
  const int64_t Vp = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  const scalar_t* S = a.student.const_data_ptr<scalar_t>();
  const scalar_t* T = a.teacher.const_data_ptr<scalar_t>();
  double* out = a.out.mutable_data_ptr<double>();
  const acc_t inv_t = acc_t(1.0 / a.temperature);

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(3 * Vp + 1);
    acc_t* A = scratch.data;
    acc_t* B = A + Vp;
    acc_t* E = B + Vp;
    for (int64_t r = begin; r < end; ++r) {
      double* o = out + r * DS::width;
      const scalar_t* s = S + r * V;
      if (V == 0) {
        o[DS::m_a] = o[DS::m_b] = o[DS::m_1] = -std::numeric_limits<double>::infinity();
        o[DS::s_a] = o[DS::r_a] = o[DS::far] = o[DS::s_b] = o[DS::s_1] = 0.0;
        continue;
      }
      const acc_t ma = load_scaled(s, A, V, Vp, inv_t);
      const acc_t mb = load_scaled(T + r * V, B, V, Vp, inv_t);
      o[DS::m_a] = ma;
      o[DS::s_a] = partial_sum(A, E, Vp, ma);
      // r = sum_j e_j expm1(b_j - a_j) over the teacher's support (-e_j off it), 0 where e_j = 0;
      // far: some support entry with |b - a| >= kCloseRow (kd_math.h's close-row rule). A far
      // slice makes the row far on every rank, where r is not used: its r is 0, and the walk stops
      // at the first far block (a student still learning: the first block).
      const Vec ninf(kNegInf), lim(static_cast<acc_t>(kCloseRow));
      double r_sum = 0;
      Vec far(0);
      for (int64_t j0 = 0; j0 < Vp && reduce_max(far) == acc_t(0); j0 += kBlock * Vec::size()) {
        const int64_t j1 = std::min(Vp, j0 + kBlock * Vec::size());
        Vec rv(0);
        for (int64_t j = j0; j < j1; j += Vec::size()) {
          const Vec e = Vec::loadu(E + j);
          const Vec b = Vec::loadu(B + j), delta = b - Vec::loadu(A + j);
          const Vec support = b != ninf;
          far = far | (support & (delta.abs() >= lim));
          const Vec em1 = expm1_near<Vec, std::is_same_v<acc_t, double> ? 17 : 10>(
              at::vec::clamp(delta, Vec(0) - lim, lim));
          rv = rv + Vec::blendv(Vec(0), Vec::blendv(Vec(0) - e, e * em1, support), e > Vec(0));
        }
        r_sum += reduce_sum(rv);
      }
      o[DS::far] = reduce_max(far) != acc_t(0) ? 1.0 : 0.0;
      o[DS::r_a] = o[DS::far] != 0.0 ? 0.0 : r_sum;
      o[DS::m_b] = mb;
      o[DS::s_b] = partial_sum(B, E, Vp, mb);
      if (a.hard && inv_t == acc_t(1)) {  // s at T = 1 is a
        o[DS::m_1] = o[DS::m_a];
        o[DS::s_1] = o[DS::s_a];
      } else if (a.hard) {
        const acc_t m1 = load_scaled(s, A, V, Vp, acc_t(1));
        o[DS::m_1] = m1;
        o[DS::s_1] = partial_sum(A, E, Vp, m1);
      } else {
        o[DS::m_1] = -std::numeric_limits<double>::infinity();
        o[DS::s_1] = 0.0;
      }
    }
  });
}

}  // namespace

FASTKD_DEFINE_KERNEL(dense_kd_stats_rows, DenseStatsArgs, student, dense_stats_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
