// The sparse-teacher KD row kernel for the CPU (forward KL; tails of DESIGN.md section 2, the
// formulas in fastkd/sparse_reference.py). Included once per ISA by isa_<isa>.cpp.
//
// Per row, two row-sized scratch buffers (three with hard labels):
//   1. load + scale + max          A = s / T                    (the only read of the row)
//   2. exp + sum with the k ids masked to -inf: E = exp(a - max), the student's tail sum over
//      j not in I directly (never S - sum_I); then the ids' own E, and the loss
//   3. gradient                    g = w (c_out E + [j in I] ((c_in - c_out) E - target)) + hard
//      part, written once. Per tail mode (fastkd/sparse_reference.py), with P = sum_I p:
//        bucket          c_in = (P + r_p) / S,  c_out = c_in - r_p / S_tail,  target p,  q over S
//        renorm_teacher  c_in = c_out = 1 / S,                            target p / P,  q over S
//        renorm_both     c_in = 1 / S_I, c_out = 0,                       target p / P,  q over S_I
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
      scalar_t* g = p.G ? p.G + r * p.V : nullptr;
      int64_t label;
      if (!kept_row(p.L, r, p.V, a.ignore_index, p.loss, g, &label)) continue;
      for (int64_t c = 0; c < K; ++c) {
        TORCH_CHECK(lp[c] == -INFINITY || (idx[c] >= 0 && idx[c] < p.V),
                    "fastkd: teacher indices must lie in [0, ", p.V, "); got ", idx[c], " at row ", r);
      }
      const acc_t ma = load_scaled(s, A, p.V, p.Vp, p.inv_t);
      if (ma == kNegInf) {  // no finite student logit: the row is empty
        zero_row(p.loss, r, g, p.V);
        continue;
      }
      // 2. exp + sum with the ids masked to -inf: the sum is the student's tail mass itself
      // (never S - sum_I); the ids' own exps are added back, a sum of positives.
      double s_in = 0, big_p = 0;
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        saved.data[c] = A[idx[c]];
        A[idx[c]] = kNegInf;
        big_p += std::exp(double(lp[c]));
      }
      const double s_tail = exp_sum(A, E, p.Vp, ma);
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        A[idx[c]] = static_cast<acc_t>(saved.data[c]);
        E[idx[c]] = std::exp(A[idx[c]] - ma);
        s_in += E[idx[c]];
      }
      const double s_all = s_tail + s_in;
      const double log_s_all = std::log(s_all);
      const bool bucket = a.tail == Tail::Bucket;
      const double r_p = bucket ? std::exp(double(TAIL[r])) : 0.0;
      const double log_norm = a.tail == Tail::RenormBoth ? std::log(s_in) : log_s_all;  // of q
      const double target_shift = bucket ? 0.0 : std::log(big_p);  // log p - shift = log target
      double kd = 0;
      for (int64_t c = 0; c < K; ++c) {
        if (lp[c] == -INFINITY) continue;
        const double lt = double(lp[c]) - target_shift;
        kd += std::exp(lt) * (lt - (double(A[idx[c]]) - double(ma) - log_norm));
      }
      if (r_p > 0) kd += r_p * (double(TAIL[r]) - (std::log(s_tail) - log_s_all));
      // 3. gradient
      acc_t ce = 0, i_s1 = 0;
      if (p.hard) ce = hard_label_ce(s, B, p.V, p.Vp, label, &i_s1);
      p.loss[r] = static_cast<acc_t>(p.w.kd_loss_weight * kd) + acc_t(p.w.hard_weight) * ce;
      if (!g) continue;
      const double c_in = bucket ? (big_p + r_p) / s_all : std::exp(-log_norm);
      const double c_out = bucket ? c_in - (s_tail > 0 ? r_p / s_tail : 0.0)
                                  : (a.tail == Tail::RenormTeacher ? c_in : 0.0);
      const Vec wc(static_cast<acc_t>(p.w.kd_grad_weight * c_out));
      if (p.hard) {
        const Vec wh(acc_t(p.w.hard_grad_weight) * i_s1);
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (wc * Vec::loadu(E + j) + wh * Vec::loadu(B + j)).store(A + j);
      } else {
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (wc * Vec::loadu(E + j)).store(A + j);
      }
      for (int64_t c = 0; c < K; ++c) {  // j in I: the in-I coefficient and the teacher's target
        if (lp[c] == -INFINITY) continue;
        const int64_t i = idx[c];
        const double target = std::exp(double(lp[c]) - target_shift);
        A[i] += static_cast<acc_t>(p.w.kd_grad_weight * ((c_in - c_out) * E[i] - target));
      }
      if (p.hard) A[label] -= acc_t(p.w.hard_grad_weight);
      store_row(A, g, p.V);
    }
  });
}

}  // namespace

void sparse_kd_rows(const SparseArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.student.scalar_type(),
                                  "fastkd_sparse_kd_rows", [&] { sparse_rows<scalar_t>(a); });
}

}  // namespace fastkd::cpu::FASTKD_ISA_NS
