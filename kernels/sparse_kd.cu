// kernels/sparse_kd.cu -- backend "cuda" of the op sparse_kd (fastkd/_ops.py).
//
// Forward KL against a sparse teacher; the per-row math is csrc/sparse_math.h's (every tail exact
// in log space, docs/design.md 2). One block (or, on sm_90, a cluster) per row, each block owning a
// slice of the row as kernels/plan.h decides, with a bitmap of the teacher's ids in its slice:
//   0. the k teacher entries: ids set in the bitmap (a repeated id, an id outside [0, V), a
//      log-prob above 0 or NaN make the row NaN -- the checks the CPU op makes on the host);
//      log P over the entries, and lse_in over the student's values at the ids (gathered)
//   1. one read of the student (cached when the plan says so): the tail's own running max and
//      sum of exp2 over the columns outside I, and s at T = 1 for hard labels; reduced over the
//      block and the cluster
//   2. the loss from sparse_math.h's coefficients, and the gradient in one write:
//      out_scale q_j - tail_scale q_j / r_q outside I, in_scale exp(a_i - in_norm) - t_i on I
#include "rows.cuh"

namespace fastkd::cuda {
namespace {

constexpr double kLogprobSlack = 1e-3;  // log-probs above this are not log-probs (raw logits?)

template <typename A>
struct SparseStats {
  MaxSum<A> tail, in, p, one;  // a outside I, a on I, the teacher's lp on I (log2 units), s at T = 1
  A bad;                       // 1: an entry the kernel cannot trust
};

template <typename A>
struct CombineSparse {
  __device__ __forceinline__ SparseStats<A> operator()(const SparseStats<A>& x, const SparseStats<A>& y) const {
    return SparseStats<A>{combine(x.tail, y.tail), combine(x.in, y.in), combine(x.p, y.p), combine(x.one, y.one),
                          x.bad > y.bad ? x.bad : y.bad};
  }
};

struct SparseLaunch {
  SparseParams p;
  int64_t slice;
  int64_t cache_bytes;  // of the cached slice (0: not cached); the bitmap follows it
};

__device__ __forceinline__ bool in_bitmap(const unsigned* bits, int64_t i) { return (bits[i >> 5] >> (i & 31)) & 1u; }

template <typename T>
__global__ void __launch_bounds__(max_threads(sizeof(T)), kMinBlocksPerSm) sparse_kd_kernel(const SparseLaunch L) {
  using A = acc_t<T>;
  using G = grad_t<T>;
  __shared__ SparseStats<A> scratch_stats[33];
  __shared__ SparseStats<A> slot_stats, row_stats;
  __shared__ double scratch_kd[33];
  __shared__ double slot_kd, row_kd;
  extern __shared__ uint4 smem_raw[];

  const SparseParams& p = L.p;
  const ClusterPos cp = cluster_pos();
  const int64_t row = blockIdx.x / cp.size, V = p.vocab, K = p.k;
  const int64_t lo = min(V, int64_t(cp.rank) * L.slice), hi = min(V, lo + L.slice);
  const T* s = static_cast<const T*>(p.student) + row * p.stride_s;
  const int64_t* ids = p.indices + row * K;
  const float* lps = p.logprobs + row * K;
  G* g = p.grad ? static_cast<G*>(p.grad) + row * V : nullptr;
  A* loss = static_cast<A*>(p.loss);
  const bool vec = aligned16(s) && (g == nullptr || aligned16(g));
  const bool lead = cp.rank == 0 && threadIdx.x == 0;
  T* cache = L.cache_bytes > 0 ? reinterpret_cast<T*>(smem_raw) : nullptr;
  unsigned* bits = reinterpret_cast<unsigned*>(reinterpret_cast<char*>(smem_raw) + L.cache_bytes);

  int64_t label;
  bool bad_label;
  if (!kept_row<A>(p, row, lo, hi, lead, g, &label, &bad_label)) return;
  const A sc = A(kLog2e * p.inv_temperature);
  const int64_t words = (hi - lo + 31) / 32;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0u;
  __syncthreads();

  // 0. the teacher's entries: the ids of this slice into the bitmap, lse_in and log P
  SparseStats<A> st{MaxSum<A>::empty(), MaxSum<A>::empty(), MaxSum<A>::empty(), MaxSum<A>::empty(),
                    bad_label ? A(1) : A(0)};
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    const float lp = lps[c];
    const int64_t id = ids[c];
    if (lp != lp || double(lp) > kLogprobSlack) st.bad = A(1);  // NaN, or not a log-probability
    if (!(lp > -INFINITY)) continue;                              // padding
    if (id < 0 || id >= V) { st.bad = A(1); continue; }
    if (id < lo || id >= hi) continue;  // another block's entry
    const unsigned bit = 1u << ((id - lo) & 31);
    if (atomicOr(&bits[(id - lo) >> 5], bit) & bit) st.bad = A(1);  // a repeated id
    st.in.add(to_acc(s[id]) * sc);
    st.p.add(A(lp) * A(kLog2e));
  }
  __syncthreads();  // the bitmap is complete

  // 1. the one read of the student: the tail outside I, s at T = 1
  walk(RowSource<T, 1>{{s}, {cache}}, lo, hi, vec, [&](int64_t j, A x) {
    if (!in_bitmap(bits, j - lo)) st.tail.add(x * sc);
    if (p.hard) st.one.add(x * A(kLog2e));
  });
  st = block_reduce(st, CombineSparse<A>{}, scratch_stats);
  st = cluster_reduce(st, CombineSparse<A>{}, &slot_stats, &row_stats);

  const double tail_lp = double(p.tail_logmass[row]);
  const bool poison = st.bad != A(0) || st.tail.poisoned() || st.in.poisoned() || st.one.poisoned() ||
                      tail_lp != tail_lp || tail_lp > kLogprobSlack;
  SparseRow r;
  r.lse_in = double(st.in.log2_total()) * kLn2;
  r.lse_tail = double(st.tail.log2_total()) * kLn2;
  r.log_p = double(st.p.log2_total()) * kLn2;
  r.tail_lp = tail_lp;
  r.lse_all = sparse_log_add(r.lse_in, r.lse_tail);
  const bool live = !poison && r.lse_all != -INFINITY;  // a student distribution
  const TailCoef co = tail_coefficients(p.tail, r);

  // 2. the loss: the terms of this slice's entries (a_i from the cache or global memory)
  const T* src = L.cache_bytes > 0 ? cache - lo : s;
  double kd = 0;
  if (live) {
    for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
      const int64_t id = ids[c];
      if (lps[c] > -INFINITY && id >= lo && id < hi) kd += sparse_term(double(lps[c]), double(to_acc(src[id]) * A(p.inv_temperature)), co);
    }
  }
  kd = block_reduce(kd, Add<double>{}, scratch_kd);
  kd = cluster_reduce(kd, Add<double>{}, &slot_kd, &row_kd);
  const A lse_1 = st.one.log2_total();
  if (lead) {
    const double total = kd + co.extra;
    const A ce = p.hard && live ? lse_1 * A(kLn2) - to_acc(s[label]) : A(0);
    loss[row] = poison ? A(NAN)
                       : (live ? A(p.w.kd_loss_weight * (total < 0 ? 0.0 : total)) + A(p.w.hard_weight) * ce : A(0));
  }

  // ... and the gradient: every column as if outside I, then the entries of I over them
  if (g) {
    if (poison) {
      fill_row(g, lo, hi, A(NAN));
    } else if (!live) {
      fill_row(g, lo, hi, A(0));
    } else {
      const A w_kd = A(p.w.kd_grad_weight);
      const A all2 = A(r.lse_all * kLog2e), tail2 = A(r.lse_tail * kLog2e), in2 = A(co.in_norm * kLog2e);
      const A out_scale = A(co.out_scale), tail_scale = A(co.tail_scale), in_scale = A(co.in_scale);
      auto below = [](A a2, A norm2) { return a2 == neg_inf<A>() ? A(0) : exp2_(a2 - norm2); };  // exp(a - norm)
      walk_store(RowSource<T, 1>{{src}, {nullptr}}, g, lo, hi, vec, [&](int64_t j, A x) {
        const A a2 = x * sc;
        return w_kd * (out_scale * below(a2, all2) - tail_scale * below(a2, tail2)) + hard_label_grad(p, j, x, label, lse_1);
      });
      __syncthreads();  // the writes above precede the entries' writes below
      for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
        const int64_t id = ids[c];
        if (!(lps[c] > -INFINITY) || id < lo || id >= hi) continue;
        const A x = to_acc(src[id]);
        const A target = A(exp(double(lps[c]) - co.shift));
        g[id] = from_acc<G>(w_kd * (in_scale * below(x * sc, in2) - target) + hard_label_grad(p, id, x, label, lse_1));
      }
    }
  }
  cluster_done();
}

template <typename T>
cudaError_t launch(const SparseParams& p, cudaStream_t stream) {
  RowPlan plan = sparse_plan(p.vocab, sizeof(T), facts_for(&sparse_kd_kernel<T>));
  const SparseLaunch L{p, plan.slice, plan.cache_bytes};
  plan.cache_bytes += sparse_bitmap_bytes(plan.slice);  // the dynamic shared memory: cache + bitmap
  return launch_rows(&sparse_kd_kernel<T>, plan, p.n, stream, L);
}

}  // namespace

cudaError_t sparse_kd(const SparseParams& p, cudaStream_t stream) {
  return for_dtype(p.dtype, [&](auto t) { return launch<decltype(t)>(p, stream); });
}

}  // namespace fastkd::cuda
