// The vocab-parallel dense loss's second kernel on the CPU (fastkd.distributed, steps 2-3): given
// the whole row's statistics (fastkd/_ops.py's DENSE_ROW: maxima, log sums, dl, U), one rank's
// slice's shares of D = sum term and U = sum u, and its slice of the gradient
// w_kd (u - q U) + w_hard (softmax(s) - onehot(label)) -- the math of
// fastkd/reference/dense_kd_shard.py, with dense_kd_kernel.h's passes 3 and 5 on the slice.
// Labels are this slice's ids (the row's label lies elsewhere when outside [0, V_slice)).
// Included per ISA by isa_<isa>.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#include "../row_columns.h"
#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {
namespace DR = ::fastkd::columns::dense_row;

// X[0:Vp] <- exp(X - m - log_s) (probabilities, formed as the reference's _probs) and LX <- their
// logs, X - m - log_s; m, log_s finite.
template <typename acc_t>
void probs(acc_t* X, acc_t* LX, int64_t Vp, double m, double log_s) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec mv(static_cast<acc_t>(m)), ls(static_cast<acc_t>(log_s)), inv(static_cast<acc_t>(std::exp(-log_s)));
  for (int64_t j = 0; j < Vp; j += Vec::size()) {
    const Vec x = Vec::loadu(X + j) - mv;
    (x - ls).store(LX + j);
    (x.exp_u20() * inv).store(X + j);
  }
}

template <typename scalar_t, Divergence D>
void dense_shard_rows(const DenseShardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  const RowLoss<scalar_t> p(a);
  const scalar_t* T = a.teacher.const_data_ptr<scalar_t>();
  const double* RS = a.row_stats.const_data_ptr<double>();
  double* parts = a.parts.mutable_data_ptr<double>();
  const Mix<Vec> mix = make_mix<Vec>(a.beta);
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(4 * p.Vp + 1);
    acc_t* A = scratch.data;  // a, then q
    acc_t* LA = A + p.Vp;     // log q
    acc_t* B = LA + p.Vp;     // b, then p, then u, then the gradient
    acc_t* LB = B + p.Vp;     // log p
    for (int64_t r = begin; r < end; ++r) {
      const double* rs = RS + r * DR::width;
      auto* g = p.G ? p.G + r * p.V : nullptr;
      const int64_t label = p.L ? p.L[r] : -1;
      const bool kept = !p.L || label != a.ignore_index;
      const bool here = p.L && kept && label >= 0 && label < p.V;
      bool poisoned = false;
      for (int c = 0; c < DR::width; ++c) poisoned = poisoned || std::isnan(rs[c]);
      if (!kept || (!poisoned && !(rs[DR::m_a] > kNegInf))) {  // ignored, or no finite student logit anywhere
        parts[2 * r] = parts[2 * r + 1] = 0.0;
        if (g) std::fill(g, g + p.V, typename RowLoss<scalar_t>::grad_t(0));
        continue;
      }
      if (poisoned) {  // a NaN or +inf read on some rank: the row is NaN (docs/math.md)
        parts[2 * r] = parts[2 * r + 1] = kNaN;
        if (g) std::fill(g, g + p.V, typename RowLoss<scalar_t>::grad_t(kNaN));
        continue;
      }
      const bool kd_on = rs[DR::m_b] > kNegInf;
      const scalar_t* s = p.S + r * p.V;
      load_scaled(s, A, p.V, p.Vp, p.inv_t);
      double d_sum = 0, u_sum = 0;
      if (kd_on) {
        load_scaled(T + r * p.V, B, p.V, p.Vp, p.inv_t);
        // d_j = (b_j - a_j) - dl, formed before A and B turn into probabilities
        const Vec dl(static_cast<acc_t>(rs[DR::dl]));
        acc_t* Dv = LB;  // (LB holds d until probs() writes log p: d is read first, below)
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (Vec::loadu(B + j) - Vec::loadu(A + j) - dl).store(Dv + j);
        probs(A, LA, p.Vp, rs[DR::m_a], rs[DR::log_s_a]);
        // p and log p, with d kept: log p goes to the gradient buffer's lanes one vector at a time
        const Vec mb(static_cast<acc_t>(rs[DR::m_b])), lsb(static_cast<acc_t>(rs[DR::log_s_b]));
        const Vec inv_b(static_cast<acc_t>(std::exp(-rs[DR::log_s_b])));
        for (int64_t j0 = 0; j0 < p.Vp; j0 += kBlock * Vec::size()) {
          const int64_t j1 = std::min(p.Vp, j0 + kBlock * Vec::size());
          Vec dv(0), uv(0);
          for (int64_t j = j0; j < j1; j += Vec::size()) {
            const Vec x = Vec::loadu(B + j) - mb;
            const Vec pj = x.exp_u20() * inv_b, lp = x - lsb;
            Vec term, u;
            Elem<D>::template eval<Ops>(pj, Vec::loadu(A + j), lp, Vec::loadu(LA + j), Vec::loadu(Dv + j), mix, term,
                                        u);
            dv = dv + term;
            uv = uv + u;
            u.store(B + j);
          }
          d_sum += reduce_sum(dv);
          u_sum += reduce_sum(uv);
        }
      } else {
        probs(A, LA, p.Vp, rs[DR::m_a], rs[DR::log_s_a]);
        std::fill(B, B + p.Vp, acc_t(0));
      }
      parts[2 * r] = d_sum;
      parts[2 * r + 1] = u_sum;
      if (!g) continue;
      // the gradient in B: w_kd (u - q U) (0 without a KD term) + w_hard softmax(s), less w_hard at the label
      if (kd_on) {
        const Vec wkd(acc_t(p.w.kd_grad_weight)), Uv(gradient_u(static_cast<acc_t>(rs[DR::u])));
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) {
          (wkd * (Vec::loadu(B + j) - Vec::loadu(A + j) * Uv)).store(B + j);
        }
      }
      if (p.hard) {
        load_scaled(s, LA, p.V, p.Vp, acc_t(1));
        probs(LA, LB, p.Vp, rs[DR::m_1], rs[DR::log_s_1]);
        const Vec wh(acc_t(p.w.hard_grad_weight));
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (Vec::loadu(B + j) + wh * Vec::loadu(LA + j)).store(B + j);
        if (here) B[label] -= acc_t(p.w.hard_grad_weight);
      }
      store_row(B, g, p.V);
    }
  });
}

}  // namespace

FASTKD_DEFINE_DIVERGENCE_KERNEL(dense_kd_shard_rows, DenseShardArgs, dense_shard_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
