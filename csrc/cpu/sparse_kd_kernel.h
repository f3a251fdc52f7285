// The sparse-teacher KD row kernel for the CPU (forward KL; tails of DESIGN.md section 2, the
// formulas in fastkd/sparse_reference.py). Included once per ISA by isa_<isa>.cpp.
//
// Per row, two row-sized scratch buffers (three with hard labels):
//   1. load + scale + max          A = s / T                    (the only read of the row)
//   2. exp + sum with the k ids masked to -inf: E = exp(a - max), the student's tail sum over
//      j not in I directly (never S - sum_I); then the ids' own E, and the loss
//   4. gradient                    g = w (E * c - teacher at I) + hard part, written once
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "kd_loss_cpu.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {

template <typename scalar_t>
void sparse_rows(const SparseArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const int64_t N = a.student.size(0), V = a.student.size(1), K = a.indices.size(1);
  const int64_t Vp = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  const scalar_t* S = a.student.const_data_ptr<scalar_t>();
  const int64_t* IDX = a.indices.const_data_ptr<int64_t>();
  const float* LP = a.logprobs.const_data_ptr<float>();
  const float* TAIL = a.tail_logmass.const_data_ptr<float>();
  const int64_t* L = a.labels.defined() ? a.labels.const_data_ptr<int64_t>() : nullptr;
  acc_t* loss = a.loss.mutable_data_ptr<acc_t>();
  scalar_t* G = a.compute_grad ? a.grad.mutable_data_ptr<scalar_t>() : nullptr;
  const RowWeights w = row_weights(a.temperature, a.hard_weight, a.scale_by_t2);
  const acc_t inv_t = acc_t(1.0 / a.temperature);
  const bool hard = a.hard_weight > 0;

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch((hard ? 3 : 2) * Vp);
    Scratch<double> saved(K);  // a at the ids while the exp pass masks them
    acc_t* A = scratch.data;
    acc_t* E = A + Vp;
    acc_t* B = E + Vp;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = S + r * V;
      const int64_t* idx = IDX + r * K;
      const float* lp = LP + r * K;
      scalar_t* g = G ? G + r * V : nullptr;
      int64_t label;
      if (!kept_row(L, r, V, a.ignore_index, loss, g, &label)) continue;
      for (int64_t c = 0; c < K; ++c) {
        TORCH_CHECK(lp[c] == -INFINITY || (idx[c] >= 0 && idx[c] < V),
                    "fastkd: teacher indices must lie in [0, ", V, "); got ", idx[c], " at row ", r);
      }
      const acc_t ma = load_scaled(s, A, V, Vp, inv_t);
      if (ma == kNegInf) {
        loss[r] = 0;
        if (g) std::fill(g, g + V, scalar_t(0));
        continue;
      }
      // 2 + 3. exp + sum with the ids masked to -inf: the sum is the student's tail mass itself
      // (never S - sum_I); the ids' own exps are added back, a sum of positives.
      double s_in = 0, big_p = 0;
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        saved.data[c] = A[idx[c]];
        A[idx[c]] = kNegInf;
        big_p += std::exp(double(lp[c]));
      }
      const double s_tail = exp_sum(A, E, Vp, ma);
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        A[idx[c]] = static_cast<acc_t>(saved.data[c]);
        E[idx[c]] = std::exp(A[idx[c]] - ma);
        s_in += E[idx[c]];
      }
      const double s_all = s_tail + s_in;
      const double log_s_all = std::log(s_all);
      const double log_norm = a.tail == Tail::RenormBoth ? std::log(s_in) : log_s_all;
      const double log_big_p = std::log(big_p);
      const double tail_lp = TAIL[r];
      const double r_p = a.tail == Tail::Bucket ? std::exp(tail_lp) : 0.0;
      double kd = 0;
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        const double lq = double(A[idx[c]]) - double(ma) - log_norm;
        const double lpc = a.tail == Tail::Bucket ? double(lp[c]) : double(lp[c]) - log_big_p;
        kd += std::exp(lpc) * (lpc - lq);
      }
      if (r_p > 0) kd += r_p * (tail_lp - (std::log(s_tail) - log_s_all));
      // 4. gradient: E * c_all everywhere, then the ids' own values
      acc_t ce = 0, i_s1 = 0;
      if (hard) {
        const acc_t m1 = load_scaled(s, B, V, Vp, acc_t(1));
        const double s1 = exp_sum(B, B, Vp, m1);
        i_s1 = static_cast<acc_t>(1.0 / s1);
        ce = static_cast<acc_t>(double(m1) + std::log(s1) - double(s[label]));
      }
      loss[r] = static_cast<acc_t>(w.kd_loss_weight * kd) + acc_t(w.hard_weight) * ce;
      if (!g) continue;
      double c_all = 0;  // d/da_j = E_j * c_all for j outside I
      if (a.tail == Tail::Bucket) c_all = (big_p + r_p) / s_all - (s_tail > 0 ? r_p / s_tail : 0.0);
      if (a.tail == Tail::RenormTeacher) c_all = 1.0 / s_all;
      const Vec wc(static_cast<acc_t>(w.kd_grad_weight * c_all));
      if (hard) {
        const Vec wh(acc_t(w.hard_weight) * i_s1);
        for (int64_t j = 0; j < Vp; j += Vec::size()) (wc * Vec::loadu(E + j) + wh * Vec::loadu(B + j)).store(A + j);
      } else {
        for (int64_t j = 0; j < Vp; j += Vec::size()) (wc * Vec::loadu(E + j)).store(A + j);
      }
      for (int64_t c = 0; c < K; ++c) {  // j in I: the in-I coefficient and the teacher's target
        if (lp[c] == -INFINITY) continue;
        const int64_t i = idx[c];
        double gi;
        if (a.tail == Tail::Bucket) {
          gi = E[i] * (big_p + r_p) / s_all - std::exp(double(lp[c]));
        } else if (a.tail == Tail::RenormTeacher) {
          gi = E[i] / s_all - std::exp(double(lp[c]) - log_big_p);
        } else {
          gi = E[i] / s_in - std::exp(double(lp[c]) - log_big_p);
        }
        A[i] += static_cast<acc_t>(w.kd_grad_weight * gi) - static_cast<acc_t>(w.kd_grad_weight * c_all) * E[i];
      }
      if (hard) A[label] -= acc_t(w.hard_weight);
      store_row(A, g, V);
    }
  });
}

}  // namespace

void sparse_kd_rows(const SparseArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.student.scalar_type(),
                                  "fastkd_sparse_kd_rows", [&] { sparse_rows<scalar_t>(a); });
}

}  // namespace fastkd::cpu::FASTKD_ISA_NS
