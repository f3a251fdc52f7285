// The sparse-teacher KD row kernel for the CPU (forward KL; the per-row math is
// csrc/sparse_math.h, the torch twin fastkd/reference/sparse_kd.py). Included once per ISA by
// isa_<isa>.cpp.
//
// Per row, two row-sized scratch buffers (three with hard labels):
//   1. load + scale + max          A = s / T                    (the only read of the row)
//   2. the k ids are masked to -inf and exp + sum runs over the tail at the tail's own maximum:
//      E = exp(a - max_tail) outside I, 0 on I; lse_tail, then lse_in over the ids, lse_all
//   3. loss and gradient from sparse_math.h's coefficients: outside I, g = c_out E with
//      c_out = out_scale exp(max_tail - lse_all) - tail_scale exp(max_tail - lse_tail); on I,
//      g = in_scale exp(a_i - in_norm) - t_i; plus the hard-label part, written once.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {

template <typename scalar_t>
void sparse_rows(const SparseArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const RowLoss<scalar_t> p(a);
  const int64_t K = a.indices.size(1);
  const int64_t* IDX = a.indices.const_data_ptr<int64_t>();
  const float* LP = a.logprobs.const_data_ptr<float>();
  const float* TAIL = a.tail_logmass.const_data_ptr<float>();

  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch((p.hard ? 3 : 2) * p.Vp);
    Scratch<double> saved(K);  // a at the ids while the exp pass masks them
    acc_t* A = scratch.data;
    acc_t* E = A + p.Vp;
    acc_t* B = E + p.Vp;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = p.S + r * p.V;
      const int64_t* idx = IDX + r * K;
      const float* lp = LP + r * K;
      auto* g = p.G ? p.G + r * p.V : nullptr;
      int64_t label;
      if (!kept_row(p.L, r, p.V, a.ignore_index, p.loss, g, &label)) continue;
      for (int64_t c = 0; c < K; ++c) {
        TORCH_CHECK_VALUE(lp[c] == -INFINITY || (idx[c] >= 0 && idx[c] < p.V),
                    "fastkd: teacher indices must lie in [0, ", p.V, "); got ", idx[c], " at row ", r);
      }
      const acc_t ma = load_scaled(s, A, p.V, p.Vp, p.inv_t);
      if (ma == kNegInf) {  // no finite student logit: the row is empty
        zero_row(p.loss, r, g, p.V);
        continue;
      }
      bool bad = std::isnan(ma) || ma == -kNegInf || std::isnan(TAIL[r]);  // NaN or +inf: a NaN row
      for (int64_t c = 0; c < K; ++c) bad = bad || std::isnan(lp[c]);
      if (bad) {
        nan_row(p.loss, r, g, p.V);
        continue;
      }
      // 2. mask the ids; the tail's maximum is the row's unless the row's maximum lies in I
      double m_in = -INFINITY, log_p = -INFINITY;
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        saved.data[c] = A[idx[c]];
        m_in = std::max(m_in, saved.data[c]);
        A[idx[c]] = kNegInf;
        log_p = sparse_log_add(log_p, double(lp[c]));
      }
      acc_t m_tail = ma;
      if (m_in == double(ma)) {
        at::vec::Vectorized<acc_t> mx(kNegInf);
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) mx = at::vec::maximum(mx, Vec::loadu(A + j));
        m_tail = reduce_max(mx);
      }
      double lse_tail = -INFINITY;
      if (m_tail != kNegInf) {
        lse_tail = double(m_tail) + std::log(exp_sum(A, E, p.Vp, m_tail));
      } else {
        std::fill(E, E + p.Vp, acc_t(0));
      }
      double s_in = 0;
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        A[idx[c]] = static_cast<acc_t>(saved.data[c]);
        s_in += std::exp(saved.data[c] - m_in);
      }
      const double lse_in = m_in == -INFINITY ? m_in : m_in + std::log(s_in);
      const SparseRow stats{sparse_log_add(lse_in, lse_tail), lse_in, lse_tail, log_p, double(TAIL[r])};
      const TailCoef co = tail_coefficients(a.tail, stats);
      double kd = co.extra;
      for (int64_t c = 0; c < K; ++c) kd += sparse_term(lp[c], lp[c] == -INFINITY ? 0.0 : saved.data[c], co);
      kd = std::max(kd, 0.0);  // a divergence is >= 0; rounding may dip below
      // 3. gradient
      acc_t ce = 0, i_s1 = 0;
      if (p.hard) ce = hard_label_ce(s, B, p.V, p.Vp, label, &i_s1);
      p.loss[r] = static_cast<acc_t>(p.w.kd_loss_weight * kd) + acc_t(p.w.hard_weight) * ce;
      if (!g) continue;
      const double c_out = m_tail == kNegInf ? 0.0
                           : co.out_scale * std::exp(double(m_tail) - stats.lse_all) -
                                 co.tail_scale * std::exp(double(m_tail) - lse_tail);
      const Vec wc(static_cast<acc_t>(p.w.kd_grad_weight * c_out));
      if (p.hard) {
        const Vec wh(acc_t(p.w.hard_grad_weight) * i_s1);
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (wc * Vec::loadu(E + j) + wh * Vec::loadu(B + j)).store(A + j);
      } else {
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (wc * Vec::loadu(E + j)).store(A + j);
      }
      for (int64_t c = 0; c < K; ++c) {  // j in I (E is 0 there): the in-I gradient
        if (lp[c] == -INFINITY) continue;
        const double gi = co.in_scale * std::exp(saved.data[c] - co.in_norm) - std::exp(double(lp[c]) - co.shift);
        A[idx[c]] += static_cast<acc_t>(p.w.kd_grad_weight * gi);
      }
      if (p.hard) A[label] -= acc_t(p.w.hard_grad_weight);
      store_row(A, g, p.V);
    }
  });
}

}  // namespace

FASTKD_DEFINE_KERNEL(sparse_kd_rows, SparseArgs, student, sparse_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
