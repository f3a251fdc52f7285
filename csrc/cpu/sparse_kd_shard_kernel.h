// The vocab-parallel sparse loss's gradient kernel on the CPU (fastkd.distributed, step 3): given
// the whole row's coefficients (fastkd/_ops.py's SPARSE_ROW), one rank's slice of
//     w_kd dloss/da_j = in_scale exp(a_j - in_norm) - t_j                              j in I
//                     = out_scale exp(a_j - lse_all) - tail_scale exp(a_j - lse_tail)  j not in I
// plus w_hard (softmax(s) - onehot(label)) -- the math of fastkd/reference/sparse_kd_shard.py;
// outside I as sparse_kd_kernel.h forms it, exp(a_j - m) times one coefficient in double (m the
// slice's maximum outside I), so no large logit loses its digits to a float subtraction.
// Included per ISA by isa_<isa>.cpp (after sparse_kd_stats_kernel.h: slice_columns).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "../row_columns.h"
#include "kernels.h"
#include "sparse_kd_stats_kernel.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {
namespace SR = ::fastkd::columns::sparse_row;

template <typename scalar_t>
void sparse_shard_rows(const SparseShardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using grad_t = typename RowLoss<scalar_t>::grad_t;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const RowLoss<scalar_t> p(a);
  const int64_t K = a.indices.size(1);
  const int64_t* IDX = a.indices.const_data_ptr<int64_t>();
  const float* LP = a.logprobs.const_data_ptr<float>();
  const double* RS = a.row_stats.const_data_ptr<double>();

  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(2 * p.Vp + 1);
    Scratch<int64_t> cols(K + 1);
    Scratch<double> saved(K + 1);
    acc_t* A = scratch.data;  // a, then the gradient
    acc_t* E = A + p.Vp;
    for (int64_t r = begin; r < end; ++r) {
      // shift, in_scale, in_norm, out_scale, lse_all, tail_scale, lse_tail, lse_1
      const double* rs = RS + r * SR::width;
      grad_t* g = p.G + r * p.V;
      const int64_t label = p.L ? p.L[r] : -1;
      const bool kept = !p.L || label != a.ignore_index;
      bool poisoned = false;
      for (int c = 0; c < SR::width; ++c) poisoned = poisoned || std::isnan(rs[c]);
      if (!kept || (!poisoned && !(rs[SR::lse_all] > -INFINITY))) {  // ignored, or no distribution to learn
        std::fill(g, g + p.V, grad_t(0));
        continue;
      }
      if (poisoned) {  // a NaN or +inf read on some rank: the row is NaN (docs/math.md)
        std::fill(g, g + p.V, grad_t(std::numeric_limits<float>::quiet_NaN()));
        continue;
      }
      if (p.V == 0) continue;
      const int64_t* idx = IDX + r * K;
      const float* lp = LP + r * K;
      load_scaled(p.S + r * p.V, A, p.V, p.Vp, p.inv_t);
      const int64_t n_in = slice_columns(idx, lp, K, p.V, cols.data);
      for (int64_t c = 0; c < n_in; ++c) {  // a over I, kept aside while the rest is formed
        saved.data[c] = A[cols.data[c]];
        A[cols.data[c]] = kNegInf;
      }
      Vec mx(kNegInf);
      for (int64_t j = 0; j < p.Vp; j += Vec::size()) mx = at::vec::maximum(mx, Vec::loadu(A + j));
      const acc_t m = reduce_max(mx);
      // outside I: w_kd (out_scale exp(m - lse_all) - tail_scale exp(m - lse_tail)) exp(a_j - m)
      if (m > kNegInf) {
        exp_sum(A, E, p.Vp, m);
        const double c_out = rs[SR::out_scale] * std::exp(double(m) - rs[SR::lse_all]) - rs[SR::tail_scale] * std::exp(double(m) - rs[SR::lse_tail]);
        const Vec wc(static_cast<acc_t>(p.w.kd_grad_weight * c_out));
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (wc * Vec::loadu(E + j)).store(A + j);
      } else {
        std::fill(A, A + p.Vp, acc_t(0));
      }
      // on I: w_kd (in_scale exp(a_j - in_norm) - the targets t_c = exp(lp_c - shift) of its entries)
      for (int64_t c = 0; c < n_in; ++c) {
        const double x = saved.data[c];
        A[cols.data[c]] = static_cast<acc_t>(p.w.kd_grad_weight * (x > -INFINITY ? rs[SR::in_scale] * std::exp(x - rs[SR::in_norm]) : 0.0));
      }
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] > -INFINITY && idx[c] >= 0 && idx[c] < p.V) {
          A[idx[c]] -= static_cast<acc_t>(p.w.kd_grad_weight * std::exp(double(lp[c]) - rs[SR::shift]));
        }
      }
      if (p.hard) {  // + w_hard softmax(s) (lse_1 the row's), - w_hard at a label in this slice
        const acc_t m1 = load_scaled(p.S + r * p.V, E, p.V, p.Vp, acc_t(1));
        if (m1 > kNegInf) {
          exp_sum(E, E, p.Vp, m1);
          const Vec wh(static_cast<acc_t>(p.w.hard_grad_weight * std::exp(double(m1) - rs[SR::lse_1])));
          for (int64_t j = 0; j < p.Vp; j += Vec::size()) (Vec::loadu(A + j) + wh * Vec::loadu(E + j)).store(A + j);
        }
        if (p.L && label >= 0 && label < p.V) A[label] -= acc_t(p.w.hard_grad_weight);
      }
      store_row(A, g, p.V);
    }
  });
}

}  // namespace

FASTKD_DEFINE_KERNEL(sparse_kd_shard_rows, SparseShardArgs, student, sparse_shard_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
