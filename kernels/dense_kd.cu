// kernels/dense_kd.cu -- backend "cuda" of the op dense_kd (fastkd/_ops.py).
//
// One block per row, or on sm_90 a thread-block cluster per row, each block owning a slice of
// the row (kernels/plan.h decides). The math is csrc/kd_math.h's, the same as every backend's.
//   1. one read of student and teacher (16-byte vectors), kept in shared memory when the plan
//      caches the slice: running max / sum of exp2 of a = s/T, b = t/T (and s for hard labels),
//      and the close-row sum r = sum exp(a - m) expm1(b - a); reduced over the block (shuffles)
//      and the cluster (distributed shared memory)
//   2. from the cache (or global memory): p, q and the divergence terms; D and U = sum u. For
//      forward KL (U = -1) the gradient is written here
//   3. the other divergences' gradient, now that U is known: g = w_kd (u - q U) + w_hard (softmax(s)
//      - onehot(label)), in the student's dtype (fp32 for fp16), grad_scale folded into the weights
// A NaN or +inf logit, or a kept label outside [0, V), makes the row NaN (loss and gradient); an
// ignored row, or one with no finite student logit, gets loss 0 and a zero gradient.
#include "rows.cuh"

namespace fastkd::cuda {
namespace {

template <typename A>
struct DenseStats {
  MaxSum<A> a, b, one;  // a = s/T (with the close-row sum in a.r), b = t/T, s at T = 1
  A far;                // 1 when an entry of the teacher's support has |b - a| >= kCloseRow
};

template <typename A>
struct CombineStats {
  __device__ __forceinline__ DenseStats<A> operator()(const DenseStats<A>& x, const DenseStats<A>& y) const {
    return DenseStats<A>{combine(x.a, y.a), combine(x.b, y.b), combine(x.one, y.one), x.far > y.far ? x.far : y.far};
  }
};

template <typename A>
struct Sums {
  A d, u;
};

template <typename A>
struct AddSums {
  __device__ __forceinline__ Sums<A> operator()(const Sums<A>& x, const Sums<A>& y) const {
    return Sums<A>{x.d + y.d, x.u + y.u};
  }
};

// What a launch passes besides DenseParams: the plan's slice, and whether it is cached.
struct DenseLaunch {
  DenseParams p;
  int64_t slice;
  bool cached;
};

template <typename T, Divergence D>
__global__ void __launch_bounds__(max_threads(sizeof(T)), kMinBlocksPerSm) dense_kd_kernel(const DenseLaunch L) {
  using A = acc_t<T>;
  using G = grad_t<T>;
  using Ops = ScalarOps<A>;
  constexpr int kDegree = sizeof(A) == 8 ? 17 : 10;
  __shared__ DenseStats<A> scratch_stats[33];
  __shared__ DenseStats<A> slot_stats, row_stats;
  __shared__ Sums<A> scratch_sums[33];
  __shared__ Sums<A> slot_sums, row_sums;
  extern __shared__ uint4 cache_raw[];

  const DenseParams& p = L.p;
  const ClusterPos cp = cluster_pos();
  const int64_t row = blockIdx.x / cp.size, V = p.vocab;
  const int64_t lo = min(V, int64_t(cp.rank) * L.slice), hi = min(V, lo + L.slice);
  const T* s = static_cast<const T*>(p.student) + row * p.stride_s;
  const T* t = static_cast<const T*>(p.teacher) + row * p.stride_t;
  G* g = p.grad ? static_cast<G*>(p.grad) + row * V : nullptr;
  A* loss = static_cast<A*>(p.loss);
  const bool vec = aligned16(s) && aligned16(t) && (g == nullptr || aligned16(g));
  const bool lead = cp.rank == 0 && threadIdx.x == 0;  // writes the row's loss

  int64_t label;
  bool bad_label;
  if (!kept_row<A>(p, row, lo, hi, lead, g, &label, &bad_label)) return;
  // The hard-label term's cross-entropy, known after pass 1 and written with the loss at the end:
  // kept in shared memory by the one thread that needs it. In a register, ptxas spilled it (or the
  // row's address it is read through) to local memory across the passes (bf16, sm_90a / sm_100a).
  __shared__ A ce_of_row;

  // 1. the one read of the inputs: online statistics, the slice cached on the way
  T* cs = L.cached ? reinterpret_cast<T*>(cache_raw) : nullptr;
  T* ct = L.cached ? cs + L.slice : nullptr;
  const A sc = A(kLog2e * p.inv_temperature);
  DenseStats<A> st{MaxSum<A>::empty(), MaxSum<A>::empty(), MaxSum<A>::empty(), A(0)};
  walk(RowSource<T, 2>{{s, t}, {cs, ct}}, lo, hi, vec, [&](int64_t, A x, A y) {
    const A a2 = x * sc, b2 = y * sc;
    const A delta = (b2 - a2) * A(kLn2);
    const bool support = b2 != neg_inf<A>();
    if (support && !(Ops::abs(delta) < A(kCloseRow))) st.far = A(1);
    const A clamped = delta < A(-kCloseRow) ? A(-kCloseRow) : (delta > A(kCloseRow) ? A(kCloseRow) : delta);
    st.a.add(a2, support ? expm1_near<A, kDegree>(clamped) : A(-1));
    st.b.add(b2);
    if (p.hard) st.one.add(x * A(kLog2e));
  });
  st = block_reduce(st, CombineStats<A>{}, scratch_stats);  // (its barriers also publish the cache)
  st = cluster_reduce(st, CombineStats<A>{}, &slot_stats, &row_stats);

  const A lse_a = st.a.log2_total(), lse_b = st.b.log2_total(), lse_1 = st.one.log2_total();
  const bool poison = st.a.poisoned() || st.b.poisoned() || st.one.poisoned() || bad_label;
  const bool live = !poison && st.a.m != neg_inf<A>();  // a student distribution
  if (lead) ce_of_row = p.hard && live ? lse_1 * A(kLn2) - to_acc(s[label]) : A(0);
  const bool kd_on = live && st.b.m != neg_inf<A>();    // ... and a teacher distribution
  // lse(b) - lse(a) in nats: log1p(R) for a close row (kd_math.h), else the difference
  const A dl = !kd_on ? A(0) : (st.far == A(0) ? Ops::log1p(st.a.r / st.a.s) : (lse_b - lse_a) * A(kLn2));
  const Mix<A> mix{A(p.beta), A(1.0 - p.beta), A(p.beta > 0 ? log(p.beta) : -INFINITY),
                   A(p.beta < 1 ? log1p(-p.beta) : -INFINITY)};
  const A w_kd = A(p.w.kd_grad_weight);
  const RowSource<T, 2> again{{L.cached ? cs - lo : s, L.cached ? ct - lo : t}, {nullptr, nullptr}};

  // The KD terms of one column: q (returned) and term, u (0 without a teacher distribution).
  auto terms = [&](A x, A y, A& term, A& u) {
    const A a2 = x * sc, b2 = y * sc;
    const A q = exp2_(a2 - lse_a), pt = exp2_(b2 - lse_b);
    Elem<D>::template eval<Ops>(pt, q, (b2 - lse_b) * A(kLn2), (a2 - lse_a) * A(kLn2), (b2 - a2) * A(kLn2) - dl,
                                mix, term, u);
    if (!kd_on) term = u = A(0);
    return q;
  };

  // 2. the divergence sums (and forward KL's gradient)
  Sums<A> sums{A(0), A(0)};
  if (live) {
    if (D == Divergence::ForwardKL && g) {
      walk_store(again, g, lo, hi, vec, [&](int64_t j, A x, A y) {
        A term, u;
        const A q = terms(x, y, term, u);
        sums.d += term;
        sums.u += u;
        return (kd_on ? w_kd * (u + q) : A(0)) + hard_label_grad(p, j, x, label, lse_1);  // u - q U with U = -1
      });
    } else {
      walk(again, lo, hi, vec, [&](int64_t, A x, A y) {
        A term, u;
        (void)terms(x, y, term, u);
        sums.d += term;
        sums.u += u;
      });
    }
  }
  sums = block_reduce(sums, AddSums<A>{}, scratch_sums);
  sums = cluster_reduce(sums, AddSums<A>{}, &slot_sums, &row_sums);
  if (lead) {
    const A kd = sums.d < A(0) ? A(0) : sums.d;  // a divergence is >= 0; rounding may dip below
    loss[row] = poison ? A(NAN) : (live ? A(p.w.kd_loss_weight) * kd + A(p.w.hard_weight) * ce_of_row : A(0));
  }

  // 3. the gradient of the divergences whose U is only known now
  if (g) {
    if (poison) {
      fill_row(g, lo, hi, A(NAN));
    } else if (!live) {
      fill_row(g, lo, hi, A(0));
    } else if (D != Divergence::ForwardKL) {
      const A big_u = gradient_u(sums.u);
      walk_store(again, g, lo, hi, vec, [&](int64_t j, A x, A y) {
        A term, u;
        const A q = terms(x, y, term, u);
        return (kd_on ? w_kd * (u - q * big_u) : A(0)) + hard_label_grad(p, j, x, label, lse_1);
      });
    }
  }
  cluster_done();
}

template <typename T, Divergence D>
cudaError_t launch(const DenseParams& p, cudaStream_t stream) {
  const RowPlan plan = dense_plan(p.vocab, sizeof(T), D == Divergence::ForwardKL, facts_for(&dense_kd_kernel<T, D>));
  const DenseLaunch L{p, plan.slice, plan.cache_bytes > 0};
  return launch_rows(&dense_kd_kernel<T, D>, plan, p.n, stream, L);
}

template <typename T>
cudaError_t launch_for(const DenseParams& p, cudaStream_t stream) {
  return with_divergence(p.divergence, [&](auto d) { return launch<T, decltype(d)::value>(p, stream); });
}

}  // namespace

cudaError_t dense_kd(const DenseParams& p, cudaStream_t stream) {
  return for_dtype(p.dtype, [&](auto t) { return launch_for<decltype(t)>(p, stream); });
}

}  // namespace fastkd::cuda
