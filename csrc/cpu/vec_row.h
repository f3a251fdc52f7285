// Row helpers shared by the CPU kernels (dense_kd, sparse_kd): vectorised load/scale/max,
// exp-and-sum with blocked accumulation, the Ops policy of kd_math.h for at::vec, row scratch.
// Included per ISA (see isa_*.cpp), after ATen's CPU_CAPABILITY macros are set.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../kd_math.h"
#include "kernels.h"

namespace fastkd::cpu::FASTKD_ISA_NS {
namespace {

// kd_math.h's Ops policy for at::vec::Vectorized.
template <typename acc_t>
struct VecOps {
  using Vec = at::vec::Vectorized<acc_t>;
  static Vec log(Vec x) { return x.log(); }
  static Vec exp(Vec x) { return x.exp(); }
  static Vec abs(Vec x) { return x.abs(); }
  static Vec unless_zero(Vec w, Vec y) { return Vec::blendv(y, Vec(0), w == Vec(0)); }
  static Vec sign(Vec x) {
    return Vec::blendv(Vec::blendv(Vec(0), Vec(1), x > Vec(0)), Vec(-1), x < Vec(0));
  }
  static Vec expm1(Vec x) { return x.expm1(); }
  static Vec log1p(Vec x) { return x.log1p(); }
  static Vec near_zero(Vec x) { return x.abs() < Vec(1); }  // a lane mask
  static Vec select(Vec mask, Vec a, Vec b) { return Vec::blendv(b, a, mask); }
  static Vec logaddexp(Vec x, Vec y) {
    const Vec hi = at::vec::maximum(x, y);
    const Vec lo = at::vec::minimum(x, y);
    const Vec ninf(-std::numeric_limits<acc_t>::infinity());
    return Vec::blendv(hi + (lo - hi).exp().log1p(), ninf, hi == ninf);
  }
};

// Row-sized scratch, one per thread. (Not std::vector: this file is compiled once per ISA, and an
// AVX-512 copy of a shared std:: template could be the one the linker keeps for all three.)
template <typename acc_t>
struct Scratch {
  acc_t* data;
  explicit Scratch(int64_t n) : data(new acc_t[n]) {}
  ~Scratch() { delete[] data; }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// What a row-loss kernel reads off its RowLossArgs: sizes (Vp: V padded to whole vectors),
// the student, labels (null: none), loss and gradient (null: not asked for) rows, the weights.
template <typename scalar_t>
struct RowLoss {
  using acc_t = at::opmath_type<scalar_t>;
  // The kept gradient's type: the logits', but float for Half (fastkd/_ops.py grad_dtype).
  using grad_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, float, scalar_t>;
  int64_t N, V, Vp;
  const scalar_t* S;
  const int64_t* L;
  acc_t* loss;
  grad_t* G;
  RowWeights w;
  acc_t inv_t;
  bool hard;

  explicit RowLoss(const RowLossArgs& a)
      : N(a.student.size(0)),
        V(a.student.size(1)),
        Vp((V + at::vec::Vectorized<acc_t>::size() - 1) / at::vec::Vectorized<acc_t>::size() *
           at::vec::Vectorized<acc_t>::size()),
        S(a.student.const_data_ptr<scalar_t>()),
        L(a.labels.defined() ? a.labels.const_data_ptr<int64_t>() : nullptr),
        loss(a.loss.mutable_data_ptr<acc_t>()),
        G(a.compute_grad ? a.grad.mutable_data_ptr<grad_t>() : nullptr),
        w(row_weights(a.temperature, a.hard_weight, a.scale_by_t2, a.grad_scale)),
        inv_t(acc_t(1.0 / a.temperature)),
        hard(a.hard_weight > 0) {}
};

template <typename acc_t>
acc_t reduce_sum(at::vec::Vectorized<acc_t> v) {
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return x + y; }, v);
}

template <typename acc_t>
acc_t reduce_max(at::vec::Vectorized<acc_t> v) {
  return at::vec::vec_reduce_all<acc_t>([](auto x, auto y) { return at::vec::maximum(x, y); }, v);
}

// dst[0:V] = src * scale (in acc_t), dst[V:Vp] = -inf (contributes nothing anywhere); returns max.
template <typename scalar_t, typename acc_t>
acc_t load_scaled(const scalar_t* src, acc_t* dst, int64_t V, int64_t Vp, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* from = dst;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    from = src;  // scale straight from the input row
  } else {
    at::vec::convert(src, dst, V);
  }
  const Vec sc(scale);
  Vec mx(kNegInf);
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    const Vec x = Vec::loadu(from + j) * sc;
    x.store(dst + j);
    mx = at::vec::maximum(mx, x);
  }
  if (j < Vp) {  // the last partial vector, padded with -inf
    const Vec x = Vec::set(Vec(kNegInf), Vec::loadu(from + j, V - j) * sc, V - j);
    x.store(dst + j);
    mx = at::vec::maximum(mx, x);
  }
  return reduce_max(mx);
}

// dst[0:V] = src[0:V] in the output dtype.
template <typename scalar_t, typename acc_t>
void store_row(const acc_t* src, scalar_t* dst, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    std::memcpy(dst, src, V * sizeof(acc_t));
  } else {
    at::vec::convert(src, dst, V);
  }
}

// E = exp(X - m); returns sum(E). m must be finite. The sum is fp32 within blocks of
// kBlock vectors and double across them: a plain fp32 sum of 32k terms drifts by ~1e-6
// relative, which is the whole KL of a nearly converged student.
constexpr int64_t kBlock = 64;  // vectors per fp32 partial sum

template <typename acc_t>
double exp_sum(const acc_t* X, acc_t* E, int64_t Vp, acc_t m) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec mv(m);
  double total = 0;
  for (int64_t j0 = 0; j0 < Vp; j0 += kBlock * Vec::size()) {
    const int64_t j1 = std::min(Vp, j0 + kBlock * Vec::size());
    Vec acc(0);
    for (int64_t j = j0; j < j1; j += Vec::size()) {
      const Vec e = (Vec::loadu(X + j) - mv).exp_u20();
      e.store(E + j);
      acc = acc + e;
    }
    total += reduce_sum(acc);
  }
  return total;
}

// (max, sum exp(x - max)) partial statistics of a loaded row X[0:Vp] with maximum m (E <- the
// exponentials): sum 0 (and E 0) for a row with no finite entry, NaN for one holding a NaN or
// +inf (fastkd/_math.py's max_sum: the vocab-parallel partial forms' log-sum-exp of a slice).
template <typename acc_t>
double partial_sum(const acc_t* X, acc_t* E, int64_t Vp, acc_t m) {
  const bool bad = std::isnan(m) || m == std::numeric_limits<acc_t>::infinity();
  if (bad || m == -std::numeric_limits<acc_t>::infinity()) {
    std::fill(E, E + Vp, acc_t(0));  // (no share of a close-row sum: the reference's e > 0 fails)
    return bad ? std::numeric_limits<double>::quiet_NaN() : 0.0;
  }
  return exp_sum(X, E, Vp, m);
}

// The hard-label term at temperature 1 of student row s (V entries): B[0:Vp] <- exp(s - max s),
// *inv_sum <- 1 / sum of them (so softmax(s) = B * inv_sum); returns CE = lse(s) - s[label].
template <typename scalar_t, typename acc_t>
acc_t hard_label_ce(const scalar_t* s, acc_t* B, int64_t V, int64_t Vp, int64_t label, acc_t* inv_sum) {
  const acc_t m1 = load_scaled(s, B, V, Vp, acc_t(1));
  const double s1 = exp_sum(B, B, Vp, m1);
  *inv_sum = static_cast<acc_t>(1.0 / s1);
  return static_cast<acc_t>(double(m1) + std::log(s1) - double(s[label]));
}

// A row that contributes nothing: loss 0 and, when there is one, a zero gradient row.
template <typename scalar_t, typename acc_t>
void zero_row(acc_t* loss, int64_t r, scalar_t* g, int64_t V) {
  loss[r] = 0;
  if (g) std::fill(g, g + V, scalar_t(0));
}

// A row that has a NaN (or +inf) among the values it reads: loss NaN and, when there is one, an
// all-NaN gradient row (docs/math.md, "NaN is never hidden").
template <typename scalar_t, typename acc_t>
void nan_row(acc_t* loss, int64_t r, scalar_t* g, int64_t V) {
  loss[r] = std::numeric_limits<acc_t>::quiet_NaN();
  if (g) std::fill(g, g + V, scalar_t(std::numeric_limits<float>::quiet_NaN()));
}

// The label of row r (-1 without labels), after checking it; returns false for an ignored row,
// whose loss and gradient it zeroes.
template <typename scalar_t, typename acc_t>
bool kept_row(const int64_t* labels, int64_t r, int64_t V, int64_t ignore_index, acc_t* loss,
              scalar_t* g, int64_t* label) {
  *label = -1;
  if (!labels) return true;
  *label = labels[r];
  if (*label == ignore_index) {
    zero_row(loss, r, g, V);
    return false;
  }
  TORCH_CHECK_VALUE(*label >= 0 && *label < V, "fastkd: labels must lie in [0, ", V,
              ") or equal ignore_index=", ignore_index, "; got ", *label, " at row ", r);
  return true;
}

}  // namespace
}  // namespace fastkd::cpu::FASTKD_ISA_NS

// A CPU kernel's entry point, written once: fn(a) dispatches on the dtype of a.input to
// impl<scalar_t>(a), for every float dtype the ops take (fp32, fp64, bf16, fp16) -- and, for the
// divergence kernels, on a.divergence to impl<scalar_t, D>(a) through with_divergence (kd_math.h).
// Used inside namespace fastkd::cpu::FASTKD_ISA_NS, after the kernel's impl template.
#define FASTKD_DEFINE_KERNEL(fn, Args, input, impl)                                                   \
  void fn(const Args& a) {                                                                            \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.input.scalar_type(), "fastkd_" #fn, \
                                    [&] { impl<scalar_t>(a); });                                      \
  }
#define FASTKD_DEFINE_DIVERGENCE_KERNEL(fn, Args, impl)                                              \
  void fn(const Args& a) {                                                                           \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.student.scalar_type(), "fastkd_" #fn, \
                                    [&] {                                                            \
                                      with_divergence(a.divergence, [&](auto d) {                    \
                                        impl<scalar_t, decltype(d)::value>(a);                       \
                                      });                                                            \
                                    });                                                              \
  }
