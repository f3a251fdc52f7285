// csrc/kd_math.h -- the per-element math of every dense divergence, written once.
//
// Every backend (C++ CPU, CUDA) includes this header; fastkd/_math.py is its PyTorch twin and
// the two are kept line-for-line alike. Per row, with p = softmax(t/T) (teacher) and
// q = softmax(s/T) (student), a divergence D is given by two per-element quantities:
//
//   term_j  : D = sum_j term_j
//   u_j     : the q-weighted score, so that dD/d(s_j/T) = u_j - q_j * U with U = sum_j u_j
//
// (softmax Jacobian: dD/da_j = q_j (g_j - sum_k q_k g_k) with g = dD/dq; u_j = q_j g_j up to a
// constant that cancels). Terms use the convention 0 * log 0 = 0: an entry whose weight is
// exactly zero contributes 0 even where its log is -inf, so masked (-inf) vocabulary entries never
// produce NaN.
//
// `V` is any arithmetic type (float, double, at::vec::Vectorized<float>, ...) and `Ops` supplies
// the few non-arithmetic operations for it; ScalarOps below serves host and device scalars.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

namespace fastkd {

// The divergences of docs/design.md section 2; names are parsed in one place (divergence_from_name).
enum class Divergence : int {
  ForwardKL = 0,
  ReverseKL = 1,
  JSD = 2,
  SkewForwardKL = 3,
  SkewReverseKL = 4,
  TVD = 5,
};

// The constants of beta that the mixtures need, computed once per call.
template <typename V>
struct Mix {
  V beta, omb, log_beta, log_omb;  // beta, 1 - beta, log(beta), log(1 - beta)
};

template <typename V>
inline Mix<V> make_mix(double beta) {  // host side, once per call
  return Mix<V>{V(beta), V(1.0 - beta), V(std::log(beta)), V(std::log1p(-beta))};
}

// Scalar implementation of the Ops policy (host or device).
template <typename T>
struct ScalarOps {
  static FASTKD_HD T log(T x) { return std::log(x); }
  static FASTKD_HD T exp(T x) { return std::exp(x); }
  static FASTKD_HD T abs(T x) { return x < T(0) ? -x : x; }
  // y where w != 0, else 0: the 0 * log 0 = 0 convention.
  static FASTKD_HD T unless_zero(T w, T y) { return w == T(0) ? T(0) : y; }
  static FASTKD_HD T sign(T x) { return x > T(0) ? T(1) : (x < T(0) ? T(-1) : T(0)); }
  static FASTKD_HD T expm1(T x) { return std::expm1(x); }
  static FASTKD_HD T log1p(T x) { return std::log1p(x); }
  // a where cond, else b
  static FASTKD_HD T select(bool cond, T a, T b) { return cond ? a : b; }
  static FASTKD_HD bool near_zero(T x) { return x < T(1) && x > T(-1); }
  // log(exp(x) + exp(y)), -inf when both are -inf.
  static FASTKD_HD T logaddexp(T x, T y) {
    const T hi = x > y ? x : y;
    const T lo = x > y ? y : x;
    return hi == -INFINITY ? hi : hi + std::log1p(std::exp(lo - hi));
  }
};

// log(x / m) and log(y / m) for the mixture m = w x + (1 - w) y of two probabilities, from
// d = log x - log y alone: -log(w + (1 - w) e^-d) and -log(w e^d + 1 - w). Where |d| < 1 -- a
// student near its teacher, where training spends its time -- they are -log1p((1 - w) expm1(-d))
// and -log1p(w expm1(d)): O(d) and exact to rounding, where log x - log m of two rounded
// log-probabilities would cancel (a JSD of 1e-6 came out 8% off that way). Elsewhere, and for
// infinite d (a zero probability), the log-sum-exp forms, which are exact there.
template <typename Ops, typename V>
FASTKD_HD void mix_log_ratios(V d, V w, V omw, V log_w, V log_omw, V& lx_m, V& ly_m) {
  const auto near = Ops::near_zero(d);
  lx_m = Ops::select(near, V(0) - Ops::log1p(omw * Ops::expm1(V(0) - d)),
                     V(0) - Ops::logaddexp(log_w, log_omw - d));
  ly_m = Ops::select(near, V(0) - Ops::log1p(w * Ops::expm1(d)),
                     V(0) - Ops::logaddexp(log_w + d, log_omw));
}

// Elem<D>::eval(p, q, lp, lq, d, mix) -> term, u   (see the header comment).
// d = lp - lq, computed by the caller as (b - a) - dL with dL = lse(b) - lse(a) (close_row_shift
// below for a close row): the difference of two nearby log-probabilities without the rounding of
// each (a near-converged student has lp ~ lq, and every divergence is then a sum of O(d) terms
// that cancel to O(d^2); see docs/math.md).
template <Divergence D>
struct Elem;

template <>
struct Elem<Divergence::ForwardKL> {  // KL(p || q)
  template <typename Ops, typename V>
  static FASTKD_HD void eval(V p, V q, V lp, V lq, V d, const Mix<V>& mix, V& term, V& u) {
    (void)q; (void)lp; (void)lq; (void)mix;
    term = Ops::unless_zero(p, p * d);
    u = V(0) - p;
  }
};

template <>
struct Elem<Divergence::ReverseKL> {  // KL(q || p)
  template <typename Ops, typename V>
  static FASTKD_HD void eval(V p, V q, V lp, V lq, V d, const Mix<V>& mix, V& term, V& u) {
    (void)p; (void)lp; (void)lq; (void)mix;
    term = Ops::unless_zero(q, V(0) - q * d);
    u = term;
  }
};

template <>
struct Elem<Divergence::JSD> {  // beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q
  template <typename Ops, typename V>
  static FASTKD_HD void eval(V p, V q, V lp, V lq, V d, const Mix<V>& mix, V& term, V& u) {
    (void)lp; (void)lq;
    V lp_m, lq_m;
    mix_log_ratios<Ops>(d, mix.beta, mix.omb, mix.log_beta, mix.log_omb, lp_m, lq_m);
    const V kq = Ops::unless_zero(q, q * lq_m);
    term = Ops::unless_zero(p, mix.beta * p * lp_m) + mix.omb * kq;
    u = mix.omb * kq;
  }
};

template <>
struct Elem<Divergence::SkewForwardKL> {  // KL(p || m), m = beta p + (1-beta) q
  template <typename Ops, typename V>
  static FASTKD_HD void eval(V p, V q, V lp, V lq, V d, const Mix<V>& mix, V& term, V& u) {
    (void)lp; (void)lq;
    V lp_m, lq_m;
    mix_log_ratios<Ops>(d, mix.beta, mix.omb, mix.log_beta, mix.log_omb, lp_m, lq_m);
    term = Ops::unless_zero(p, p * lp_m);
    u = Ops::unless_zero(p, V(0) - mix.omb * q * Ops::exp(lp_m));  // -(1-beta) q p / m
  }
};

template <>
struct Elem<Divergence::SkewReverseKL> {  // KL(q || m), m = beta q + (1-beta) p
  template <typename Ops, typename V>
  static FASTKD_HD void eval(V p, V q, V lp, V lq, V d, const Mix<V>& mix, V& term, V& u) {
    (void)p; (void)lp; (void)lq;
    V lq_m, lp_m;
    mix_log_ratios<Ops>(V(0) - d, mix.beta, mix.omb, mix.log_beta, mix.log_omb, lq_m, lp_m);
    term = Ops::unless_zero(q, q * lq_m);
    u = Ops::unless_zero(q, q * (lq_m - mix.beta * Ops::exp(lq_m)));  // q (log q/m - beta q/m)
  }
};

template <>
struct Elem<Divergence::TVD> {  // 1/2 sum |p - q|
  template <typename Ops, typename V>
  static FASTKD_HD void eval(V p, V q, V lp, V lq, V d, const Mix<V>& mix, V& term, V& u) {
    (void)lp; (void)lq; (void)mix;
    // p - q = q expm1(d): exact near d = 0, where p - q of two rounded probabilities cancels
    const V diff = Ops::select(Ops::near_zero(d), q * Ops::expm1(d), p - q);
    term = V(0.5) * Ops::abs(diff);
    u = V(0.5) * q * Ops::sign(V(0) - diff);
  }
};

// A close row: every entry the teacher gives mass (b_j > -inf) has |b_j - a_j| < kCloseRow. There
// dL = lse(b) - lse(a) = log sum_j q_j e^(b_j - a_j) = log1p(R), R = sum_j q_j expm1(b_j - a_j),
// exact to rounding (R is a sum of small terms), where the difference of the two log-sum-exps,
// each rounded at its own magnitude (~log V), is off by more than a close row's whole divergence
// (a KL of 1e-6 near convergence, or at a large temperature). An entry with b_j = -inf adds -q_j.
constexpr double kCloseRow = 1.0;

// expm1(x) for |x| <= kCloseRow: Taylor to x^10/10! (x^17/17! for double), exact to rounding.
template <typename V, int Degree>
FASTKD_HD V expm1_near(V x) {
  V r(1);
  for (int k = Degree; k >= 2; --k) r = V(1) + x * V(1.0 / k) * r;
  return x * r;
}

// The U of a row's gradient u_j - q_j U. U is infinite only when the divergence is +inf through a
// log p_j = -inf that q_j > 0 meets (reverse KL, skew reverse KL at beta = 0: the teacher masks an
// id the student gives mass): the loss is then +inf, exactly, and the gradient does not exist
// (it was -inf on every id and NaN on the masked one). The rule (docs/math.md): such a row's
// gradient is NaN on every id, as a NaN input's is -- never a partly finite row. Forward KL's
// gradient (U = -1) stays finite even when its loss is +inf.
template <typename A>
FASTKD_HD A gradient_u(A u_sum) {
  return (u_sum - u_sum == A(0)) ? u_sum : A(NAN);  // finite, else NaN
}

// Per-row scalars shared by every backend: how the KD divergence and the hard-label CE combine.
//   row loss          = kd_loss_weight * D + hard_weight * CE
//   d loss / d s_j    = kd_grad_weight * (u_j - q_j U) + hard_weight * (softmax(s)_j - [j == label])
struct RowWeights {
  double kd_loss_weight;    // (1 - hard_weight) * (T^2 if scale_by_t2 else 1)
  double kd_grad_weight;    // grad_scale * kd_loss_weight / T   (chain rule through s / T)
  double hard_weight;       // of the CE term in the loss
  double hard_grad_weight;  // grad_scale * hard_weight
};

// grad_scale: the reduction's weight of each row (1 / kept rows for "mean"), folded into the
// gradient so that backward has nothing left to multiply when grad_output is that weight.
FASTKD_HD RowWeights row_weights(double temperature, double hard_weight, bool scale_by_t2,
                                 double grad_scale) {
  const double kd = (1.0 - hard_weight) * (scale_by_t2 ? temperature * temperature : 1.0);
  return RowWeights{kd, grad_scale * kd / temperature, hard_weight, grad_scale * hard_weight};
}

// The one switch from a runtime divergence to the compile-time one the kernels are templated on:
// f(std::integral_constant<Divergence, D>{}) for D = d (host code: the CPU kernels' row loops and
// the CUDA launchers; an enum value is only ever made by divergence_from_name). A new divergence
// adds its case here and nowhere else in C++.
template <typename F>
inline decltype(auto) with_divergence(Divergence d, F&& f) {
  using D = Divergence;
  switch (d) {
    case D::ReverseKL: return f(std::integral_constant<D, D::ReverseKL>{});
    case D::JSD: return f(std::integral_constant<D, D::JSD>{});
    case D::SkewForwardKL: return f(std::integral_constant<D, D::SkewForwardKL>{});
    case D::SkewReverseKL: return f(std::integral_constant<D, D::SkewReverseKL>{});
    case D::TVD: return f(std::integral_constant<D, D::TVD>{});
    case D::ForwardKL: break;
  }
  return f(std::integral_constant<D, D::ForwardKL>{});
}

}  // namespace fastkd

#if !defined(__CUDA_ARCH__)
#include <string_view>
namespace fastkd {
// The public divergence names (docs/design.md section 2), the one place C++ maps them to the enum.
inline constexpr std::string_view kDivergenceNames[] = {
    "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"};

// The enum value of `name` among `names` (in enum order); false when it is none of them.
template <typename E, int N>
inline bool enum_from_name(const std::string_view (&names)[N], std::string_view name, E* out) {
  for (int i = 0; i < N; ++i) {
    if (names[i] == name) {
      *out = static_cast<E>(i);
      return true;
    }
  }
  return false;
}

inline bool divergence_from_name(std::string_view name, Divergence* out) {
  return enum_from_name(kDivergenceNames, name, out);
}

}  // namespace fastkd
#endif
