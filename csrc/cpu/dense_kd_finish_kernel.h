// The vocab-parallel dense gradient's last pass on the CPU, for the divergences whose gradient
// needs the whole row's U (fastkd.distributed, step 3): grad -= w_kd gradient_u(U) q in place, with
// q = exp(s / T - m_a - log_s_a), one exp a column (fastkd/reference/dense_kd_finish.py).
// dense_kd_shard gave grad with U = 0 in the same pass as its shares, so the divergence's terms
// are evaluated once. Included per ISA by isa_<isa>.cpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>

#include "../row_columns.h"
#include "kernels.h"
#include "vec_row.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {
namespace DR = ::fastkd::columns::dense_row;

template <typename scalar_t>
void dense_finish_rows(const DenseFinishArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  using grad_t = typename RowLoss<scalar_t>::grad_t;
  const int64_t N = a.student.size(0), V = a.student.size(1);
  const int64_t Vp = (V + Vec::size() - 1) / Vec::size() * Vec::size();
  const scalar_t* S = a.student.const_data_ptr<scalar_t>();
  grad_t* G = a.grad.mutable_data_ptr<grad_t>();  // finished in place
  const double* RS = a.row_stats.const_data_ptr<double>();
  const acc_t inv_t = acc_t(1.0 / a.temperature);

  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(2 * Vp + 1);
    acc_t* A = scratch.data;
    acc_t* B = A + Vp;
    for (int64_t r = begin; r < end; ++r) {
      const double* rs = RS + r * DR::width;
      bool ok = rs[DR::m_a] > -INFINITY && rs[DR::m_b] > -INFINITY;
      for (int c = 0; c < DR::width; ++c) ok = ok && !std::isnan(rs[c]);
      if (!ok || V == 0) continue;  // nothing to subtract: the row as it is
      const acc_t coef = static_cast<acc_t>(a.kd_grad_weight * gradient_u(rs[DR::u]));
      load_scaled(S + r * V, A, V, Vp, inv_t);
      exp_sum(A, A, Vp, static_cast<acc_t>(rs[DR::m_a] + rs[DR::log_s_a]));  // A <- q (the sum unused)
      load_scaled(G + r * V, B, V, Vp, acc_t(1));
      const Vec cv(coef);
      for (int64_t j = 0; j < Vp; j += Vec::size()) (Vec::loadu(B + j) - cv * Vec::loadu(A + j)).store(B + j);
      store_row(B, G + r * V, V);
    }
  });
}

}  // namespace

FASTKD_DEFINE_KERNEL(dense_kd_finish_rows, DenseFinishArgs, student, dense_finish_rows)

}  // namespace fastkd::cpu::FASTKD_ISA_NS
