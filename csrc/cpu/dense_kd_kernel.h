// The dense KD row kernel for the CPU. Included once per instruction set by isa_<isa>.cpp,
// which first defines FASTKD_ISA_NS and ATen's CPU_CAPABILITY macros, so that
// at::vec::Vectorized is the AVX-512, AVX2 or plain build in that translation unit.
//
// Per row (a = s/T, b = t/T), with four row-sized fp32 (fp64 for double) scratch buffers per
// thread and no [N, V] temporary besides the gradient:
//   1. load + scale + max        A = a, B = b                  (the only read of the inputs)
//   2. exp + sum                 Q = exp(a - max a), P = exp(b - max b)
//   3. divergence terms          D = sum term, U = sum u;      Q <- q, P <- u   (kd_math.h)
//   4. hard-label CE (optional)  B <- exp(s - max s)
//   5. gradient                  g = w_kd (u - q U) + w_hard (softmax(s) - onehot(label))
// The row stays in L2 between passes, so the inputs cross DRAM once and the gradient once.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {

template <typename scalar_t, Divergence D>
void dense_rows(const DenseArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using Ops = VecOps<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  const RowLoss<scalar_t> p(a);
  const scalar_t* T = a.teacher.const_data_ptr<scalar_t>();
  const Mix<Vec> mix = make_mix<Vec>(a.beta);

  at::parallel_for(0, p.N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(4 * p.Vp);
    acc_t* A = scratch.data;
    acc_t* B = A + p.Vp;
    acc_t* Q = B + p.Vp;
    acc_t* P = Q + p.Vp;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = p.S + r * p.V;
      const scalar_t* t = T + r * p.V;
      auto* g = p.G ? p.G + r * p.V : nullptr;
      int64_t label;
      if (!kept_row(p.L, r, p.V, a.ignore_index, p.loss, g, &label)) continue;
      // 1. load, scale, max
      const acc_t ma = load_scaled(s, A, p.V, p.Vp, p.inv_t);
      const acc_t mb = load_scaled(t, B, p.V, p.Vp, p.inv_t);
      if (ma == kNegInf) {  // no finite student logit: the row is empty
        zero_row(p.loss, r, g, p.V);
        continue;
      }
      if (std::isnan(ma) || std::isnan(mb) || ma == -kNegInf || mb == -kNegInf) {
        nan_row(p.loss, r, g, p.V);  // a NaN or +inf logit (the maxima carry both): a NaN row
        continue;
      }
      // 2. exp + sum (student always, teacher when it has a finite logit)
      const double Sa = exp_sum(A, Q, p.Vp, ma);
      const double Sb = mb != kNegInf ? exp_sum(B, P, p.Vp, mb) : 0.0;
      const Vec iSa(static_cast<acc_t>(1.0 / Sa));
      acc_t div = 0, U = 0;
      if (mb != kNegInf) {
        const double la = double(ma) + std::log(Sa), lb = double(mb) + std::log(Sb);
        const Vec iSb(static_cast<acc_t>(1.0 / Sb));
        // 3a. q, and dL: log1p(R) for a close row (kd_math.h's close_row rule), else lb - la
        const Vec ninf(kNegInf);
        const Vec lim = Vec(static_cast<acc_t>(kCloseRow));
        double r_sum = 0;
        Vec far(0);  // lanes of the teacher's support with |b - a| >= kCloseRow
        for (int64_t j0 = 0; j0 < p.Vp; j0 += kBlock * Vec::size()) {
          const int64_t j1 = std::min(p.Vp, j0 + kBlock * Vec::size());
          Vec rv(0);
          for (int64_t j = j0; j < j1; j += Vec::size()) {
            const Vec q = Vec::loadu(Q + j) * iSa;
            q.store(Q + j);
            const Vec b = Vec::loadu(B + j), delta = b - Vec::loadu(A + j);
            const Vec support = b != ninf;
            far = far | (support & (delta.abs() >= lim));
            const Vec em1 = expm1_near<Vec, std::is_same_v<acc_t, double> ? 17 : 10>(
                at::vec::clamp(delta, Vec(0) - lim, lim));
            rv = rv + Vec::blendv(Vec(0), Vec::blendv(Vec(0) - q, q * em1, support), q != Vec(0));
          }
          r_sum += reduce_sum(rv);
        }
        const bool close = reduce_max(far) == acc_t(0);
        const Vec dL(static_cast<acc_t>(close ? std::log1p(r_sum) : lb - la));
        const Vec LA(static_cast<acc_t>(la)), LB(static_cast<acc_t>(lb));
        // 3. divergence terms (summed like exp_sum: fp32 in blocks, double across)
        double div_sum = 0, u_sum = 0;
        for (int64_t j0 = 0; j0 < p.Vp; j0 += kBlock * Vec::size()) {
          const int64_t j1 = std::min(p.Vp, j0 + kBlock * Vec::size());
          Vec dv(0), uv(0);
          for (int64_t j = j0; j < j1; j += Vec::size()) {
            const Vec q = Vec::loadu(Q + j);
            const Vec p = Vec::loadu(P + j) * iSb;
            const Vec a = Vec::loadu(A + j), b = Vec::loadu(B + j);
            Vec term, u;
            Elem<D>::template eval<Ops>(p, q, b - LB, a - LA, (b - a) - dL, mix, term, u);
            dv = dv + term;
            uv = uv + u;
            u.store(P + j);
          }
          div_sum += reduce_sum(dv);
          u_sum += reduce_sum(uv);
        }
        div = static_cast<acc_t>(std::max(div_sum, 0.0));  // a divergence is >= 0; rounding may dip below
        U = gradient_u(static_cast<acc_t>(u_sum));
      } else {  // no finite teacher logit: no KD term for this row
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) (Vec::loadu(Q + j) * iSa).store(Q + j);
        std::fill(P, P + p.Vp, acc_t(0));
      }
      // 4. hard-label cross-entropy at temperature 1: B <- softmax(s) numerator
      acc_t ce = 0, iS1 = 0;
      if (p.hard) ce = hard_label_ce(s, B, p.V, p.Vp, label, &iS1);
      p.loss[r] = acc_t(p.w.kd_loss_weight) * div + acc_t(p.w.hard_weight) * ce;
      if (!g) continue;
      // 5. gradient, assembled in P then written once in the student's dtype
      const Vec wkd(acc_t(p.w.kd_grad_weight)), Uv(U);
      if (p.hard) {
        const Vec wh(acc_t(p.w.hard_grad_weight) * iS1);
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) {
          const Vec gj = wkd * (Vec::loadu(P + j) - Vec::loadu(Q + j) * Uv) + wh * Vec::loadu(B + j);
          gj.store(P + j);
        }
        P[label] -= acc_t(p.w.hard_grad_weight);
      } else {
        for (int64_t j = 0; j < p.Vp; j += Vec::size()) {
          (wkd * (Vec::loadu(P + j) - Vec::loadu(Q + j) * Uv)).store(P + j);
        }
      }
      store_row(P, g, p.V);
    }
  });
}

}  // namespace

FASTKD_DEFINE_DIVERGENCE_KERNEL(dense_kd_rows, DenseArgs, dense_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
