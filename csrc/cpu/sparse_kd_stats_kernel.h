// The vocab-parallel sparse loss's first kernel on the CPU (fastkd.distributed, step 1): per row
// of one rank's slice [N, V_slice], the maxima and sums of exponentials of a = s/T over the
// slice's columns that the teacher's ids I name, over its other columns, and of s (temperature 1,
// for hard labels) -- fastkd/_ops.py's SPARSE_STATS, the math of
// fastkd/reference/sparse_kd_stats.py. Ids outside [0, V_slice) belong to other slices.
// Included per ISA by isa_<isa>.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../row_columns.h"
#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {
namespace SS = ::fastkd::columns::sparse_stats;

// The distinct columns of this slice among a row's teacher entries (finite log-prob, id in
// [0, V)), sorted, into cols; returns how many.
inline int64_t slice_columns(const int64_t* idx, const float* lp, int64_t K, int64_t V, int64_t* cols) {
  int64_t n = 0;
  for (int64_t c = 0; c < K; ++c) {
    if (lp[c] > -INFINITY && idx[c] >= 0 && idx[c] < V) cols[n++] = idx[c];
  }
  std::sort(cols, cols + n);
  return std::unique(cols, cols + n) - cols;
}

template <typename scalar_t>
void sparse_stats_rows(const SparseStatsArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
  const int64_t N = a.student.size(0), V = a.student.size(1), K = a.indices.size(1);
  const int64_t Vp = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  const scalar_t* S = a.student.const_data_ptr<scalar_t>();
  const int64_t* IDX = a.indices.const_data_ptr<int64_t>();
  const float* LP = a.logprobs.const_data_ptr<float>();
  double* out = a.out.mutable_data_ptr<double>();
  const acc_t inv_t = acc_t(1.0 / a.temperature);

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(2 * Vp + 1);
    Scratch<int64_t> cols(K + 1);
    acc_t* A = scratch.data;
    acc_t* E = A + Vp;
    for (int64_t r = begin; r < end; ++r) {
      double* o = out + r * SS::width;
      const scalar_t* s = S + r * V;
      o[SS::m_in] = o[SS::m_out] = o[SS::m_1] = -INFINITY;
      o[SS::s_in] = o[SS::s_out] = o[SS::s_1] = 0.0;
      if (V == 0) continue;
      load_scaled(s, A, V, Vp, inv_t);
      const int64_t n_in = slice_columns(IDX + r * K, LP + r * K, K, V, cols.data);
      // over I: the max and sum of the named columns (NaN for a NaN or +inf among them)
      double m_in = -INFINITY;
      bool bad_in = false;
      for (int64_t c = 0; c < n_in; ++c) {
        const double x = A[cols.data[c]];
        bad_in = bad_in || std::isnan(x) || x == INFINITY;
        m_in = std::isnan(x) ? x : std::max(m_in, x);
      }
      if (n_in > 0 && m_in > -INFINITY && !bad_in) {
        double s_in = 0;
        for (int64_t c = 0; c < n_in; ++c) s_in += std::exp(double(A[cols.data[c]]) - m_in);
        o[SS::m_in] = m_in;
        o[SS::s_in] = s_in;
      } else if (bad_in) {
        o[SS::m_in] = m_in;
        o[SS::s_in] = kNaN;
      }
      // the rest: the named columns masked out
      for (int64_t c = 0; c < n_in; ++c) A[cols.data[c]] = kNegInf;
      Vec mx(kNegInf);
      for (int64_t j = 0; j < Vp; j += Vec::size()) mx = at::vec::maximum(mx, Vec::loadu(A + j));
      const acc_t m_out = reduce_max(mx);
      o[SS::m_out] = m_out;
      o[SS::s_out] = partial_sum(A, E, Vp, m_out);
      if (a.hard) {
        const acc_t m1 = load_scaled(s, A, V, Vp, acc_t(1));
        o[SS::m_1] = m1;
        o[SS::s_1] = partial_sum(A, E, Vp, m1);
      }
    }
  });
}

}  // namespace

FASTKD_DEFINE_KERNEL(sparse_kd_stats_rows, SparseStatsArgs, student, sparse_stats_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
