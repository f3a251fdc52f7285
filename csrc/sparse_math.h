// csrc/sparse_math.h -- the per-row math of the sparse-teacher loss, written once.
//
// Every backend (C++ CPU, CUDA) includes this header; fastkd/_math.py is its PyTorch twin
// and fastkd/triton/_math.py its Triton twin, kept line-for-line alike. Forward KL of the student
// a = s / T against a teacher known on the ids I (entries with a finite log-prob lp_i), with
// p_i = exp(lp_i), P = sum_I p, r_p = exp(tail_lp) the teacher's mass outside I (docs/design.md 2):
//
//   bucket          sum_I p (log p - log q) + r_p (log r_p - log r_q)
//   renorm_teacher  sum_I p^ (log p^ - log q),      p^ = p / P
//   renorm_both     sum_I p^ (log p^ - log q^),     q^ = q / q(I)
//
// Every student quantity enters as a log-sum-exp with its own maximum: lse_all over the row,
// lse_in over I, lse_tail over the ids outside I (so log r_q = lse_tail - lse_all and
// log q^_i = a_i - lse_in), never as 1 - sum or as a sum of exp(a - row max) that may underflow:
// a row whose exact loss is finite gets a finite loss and gradient however far below the row's
// maximum its parts lie. With t_i = exp(lp_i - shift) the teacher's target on I:
//
//   loss         = sum_I t_i ((lp_i - shift) - (a_i - norm)) + extra
//   dloss/da_j   = in_scale exp(a_j - in_norm) - t_j                              j in I
//                = out_scale exp(a_j - lse_all) - tail_scale exp(a_j - lse_tail)  j not in I
//
// A row without teacher entries and without teacher tail mass has no KD term: loss 0, gradient 0
// (renorm_* without entries likewise: there is nothing to renormalise).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTKD_SHD __host__ __device__ __forceinline__
#else
#define FASTKD_SHD inline
#endif

namespace fastkd {

enum class Tail : int { Bucket = 0, RenormTeacher = 1, RenormBoth = 2 };

// A row's log-space statistics, each a log-sum-exp with its own maximum (-inf for an empty sum).
struct SparseRow {
  double lse_all;   // log sum_j exp(a_j)
  double lse_in;    // log sum_{i in I} exp(a_i)
  double lse_tail;  // log sum_{j not in I} exp(a_j)
  double log_p;     // log P = log sum_{i in I} p_i
  double tail_lp;   // log r_p (the teacher's stored tail log-mass)
};

// The coefficients of the loss and its gradient for one row (see the header comment).
struct TailCoef {
  double shift, norm, extra;
  double in_scale, in_norm, out_scale, tail_scale;
};

FASTKD_SHD double sparse_log_add(double x, double y) {  // log(e^x + e^y), -inf when both are
  const double hi = x > y ? x : y, lo = x > y ? y : x;
  return hi == -INFINITY ? hi : hi + log1p(exp(lo - hi));
}

FASTKD_SHD TailCoef tail_coefficients(Tail tail, const SparseRow& r) {
  TailCoef c{0.0, r.lse_all, 0.0, 0.0, r.lse_all, 0.0, 0.0};
  if (tail == Tail::Bucket) {
    const double r_p = exp(r.tail_lp);
    c.in_scale = c.out_scale = exp(r.log_p) + r_p;  // the teacher's whole stored mass, P + r_p
    c.tail_scale = r_p;
    // r_p (log r_p - log r_q); a tail of no student mass is +inf (the exact value)
    if (r_p > 0) c.extra = r_p * (r.tail_lp - (r.lse_tail - r.lse_all));
    return c;
  }
  if (r.log_p == -INFINITY) return c;  // no teacher entry: no KD term
  c.shift = r.log_p;                   // t = p / P
  c.in_scale = 1.0;
  if (tail == Tail::RenormTeacher) {
    c.out_scale = 1.0;  // q_j outside I
  } else {              // renorm_both: q^ over I, nothing outside I
    c.norm = c.in_norm = r.lse_in;
  }
  return c;
}

// The loss term of one id of I: t_i ((lp_i - shift) - (a_i - norm)), 0 for a padding entry.
FASTKD_SHD double sparse_term(double lp, double a, const TailCoef& c) {
  if (lp == -INFINITY) return 0.0;
  const double lt = lp - c.shift;
  return exp(lt) * (lt - (a - c.norm));
}

}  // namespace fastkd

#if !defined(__CUDA_ARCH__)
#include "kd_math.h"  // enum_from_name
namespace fastkd {
// The public tail names (docs/design.md section 2), the one place C++ maps them to the enum.
inline constexpr std::string_view kTailNames[] = {"bucket", "renorm_teacher", "renorm_both"};

inline bool tail_from_name(std::string_view name, Tail* out) { return enum_from_name(kTailNames, name, out); }
}  // namespace fastkd
#endif
