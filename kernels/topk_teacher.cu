// kernels/topk_teacher.cu -- backend "cuda" of the op topk_teacher (fastkd/_ops.py).
//
// One block per row. The k largest logits are found by a radix select on order-preserving 32-bit
// keys of the logits as floats, 8 bits a pass (2 passes for bf16, whose keys have 16 significant
// bits; 3 for fp16; 4 for fp32 and fp64): each pass histograms, in shared memory, the keys that
// share the prefix chosen so far and picks the bucket holding the k-th largest. The row is read
// from global memory once and kept in shared memory when it fits (kernels/plan.h); otherwise each
// pass re-reads it (from L2, mostly). A last pass gathers the k entries (those above the k-th
// key, then as many equal to it as still needed) and sums the tail's own exp(a - max) -- never
// Z minus the top k's sum -- and a bitonic sort in shared memory orders the k largest first.
// log p_i = a_i - log Z, tail log-mass = log(tail sum) - log Z, Z = tail sum + sum_I exp(a - max).
// A row with no finite logit gives -inf everywhere; a NaN or +inf logit gives NaN (docs/math.md).
#include <climits>
#include <type_traits>

#include "rows.cuh"

namespace fastkd::cuda {
namespace {

// Larger float -> larger key (NaN above +inf, for a sign bit of 0).
__device__ __forceinline__ unsigned order_key(float f) {
  const unsigned u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The sort's order: larger values first, ties by smaller id (padding, id INT_MAX, last).
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

struct TopkLaunch {
  TopkParams p;
  bool cached;
};

template <typename T, int kPasses>
__global__ void __launch_bounds__(max_threads(sizeof(T)), kMinBlocksPerSm) topk_teacher_kernel(const TopkLaunch L) {
  __shared__ unsigned hist[256];
  __shared__ unsigned prefix, need, above, equal;
  __shared__ float sel_val[kMaxTopk];
  __shared__ int sel_id[kMaxTopk];
  __shared__ float scratch_max[33];
  __shared__ double scratch_sum[33];
  extern __shared__ uint4 smem_raw[];

  const TopkParams& p = L.p;
  const int64_t row = blockIdx.x, V = p.vocab, K = p.k;
  const T* x_row = static_cast<const T*>(p.logits) + row * p.stride;
  float* cache = L.cached ? reinterpret_cast<float*>(smem_raw) : nullptr;
  for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0u;
  if (threadIdx.x == 0) { prefix = 0u; need = unsigned(K); above = 0u; equal = 0u; }
  __syncthreads();

  // pass 1 (the read from global memory): the row's maximum and the top byte's histogram
  float mx = -INFINITY;
  bool nan_seen = false;
  walk(RowSource<T, 1>{{x_row}, {nullptr}}, 0, V, aligned16(x_row), [&](int64_t j, acc_t<T> value) {
    const float x = float(value);
    if (cache) cache[j] = x;
    mx = x > mx ? x : mx;
    nan_seen |= x != x;
    atomicAdd(&hist[order_key(x) >> 24], 1u);
  });
  const float row_max = block_reduce(mx, [](float a, float b) { return a > b ? a : b; }, scratch_max);
  const float* src_f = cache;  // later passes: the cache, or the row again
  auto value = [&](int64_t j) { return src_f ? src_f[j] : float(to_acc(x_row[j])); };

  // the radix passes: pick the bucket of the k-th largest key, then refine within it
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = 24 - 8 * pass;
    if (pass > 0) {
      const unsigned hi_mask = 0xffffffffu << (shift + 8);
      const unsigned want = prefix;
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
        const unsigned key = order_key(value(j));
        if ((key & hi_mask) == want) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned cum = 0;
      for (int b = 255; b >= 0; --b) {
        if (cum + hist[b] >= need) {
          prefix |= unsigned(b) << shift;
          need -= cum;
          break;
        }
        cum += hist[b];
      }
    }
    __syncthreads();
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0u;
    __syncthreads();
  }
  // the k-th key and how many equal to it to keep. Keys compare on the bits the passes decided: a
  // 16-bit logit's key has no more (its lower bits are 0, or 1 for a negative value, ~bits)
  constexpr unsigned kDecided = kPasses == 4 ? 0xffffffffu : ~(0xffffffffu >> (8 * kPasses));
  const unsigned threshold = prefix, take_equal = need;

  // the gather: the k entries into shared memory, the tail's sum of exp(a - max) on the way
  const float inv_t = float(p.inv_temperature);
  const float m = row_max * inv_t;
  double tail = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float x = value(j);
    const unsigned key = order_key(x) & kDecided;
    const float a = x * inv_t;
    int slot = -1;
    if (key > threshold) {
      slot = int(atomicAdd(&above, 1u));
    } else if (key == threshold) {
      const unsigned e = atomicAdd(&equal, 1u);
      if (e < take_equal) slot = int(K - take_equal + e);
    }
    if (slot >= 0) {
      sel_val[slot] = a;
      sel_id[slot] = int(j);
    } else if (a != -INFINITY && m != -INFINITY) {
      tail += double(exp2_((a - m) * float(kLog2e)));
    }
  }
  // pad to a power of two and sort, largest first (a bitonic network: oblivious to the data)
  int P = 1;
  while (P < K) P *= 2;
  for (int64_t i = K + threadIdx.x; i < P; i += blockDim.x) {
    sel_val[i] = -INFINITY;
    sel_id[i] = INT_MAX;  // after every real entry, -inf ones included
  }
  __syncthreads();
  for (int size = 2; size <= P; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < P / 2; i += blockDim.x) {
        const int lo_i = 2 * i - (i & (stride - 1)), hi_i = lo_i + stride;
        const bool descending = (lo_i & size) == 0;
        const float a = sel_val[lo_i], b = sel_val[hi_i];
        const int ia = sel_id[lo_i], ib = sel_id[hi_i];
        if (descending ? before(b, ib, a, ia) : before(a, ia, b, ib)) {
          sel_val[lo_i] = b;
          sel_val[hi_i] = a;
          const int t = sel_id[lo_i];
          sel_id[lo_i] = sel_id[hi_i];
          sel_id[hi_i] = t;
        }
      }
      __syncthreads();
    }
  }
  double in_sum = 0;
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x)
    if (sel_val[c] != -INFINITY && m != -INFINITY) in_sum += exp(double(sel_val[c]) - double(m));
  tail = block_reduce(tail, Add<double>{}, scratch_sum);
  in_sum = block_reduce(in_sum, Add<double>{}, scratch_sum);

  const bool poison = nan_seen || row_max == INFINITY;  // a NaN or +inf logit
  const bool empty = row_max == -INFINITY;              // no finite logit
  const double log_z = double(m) + log(tail + in_sum);
  for (int64_t c = threadIdx.x; c < K; c += blockDim.x) {
    p.indices[row * K + c] = sel_id[c];
    p.logprobs[row * K + c] = poison ? NAN : (empty ? -INFINITY : float(double(sel_val[c]) - log_z));
  }
  if (threadIdx.x == 0) {
    p.tail_logmass[row] = poison ? NAN : (empty || tail == 0 ? -INFINITY : float(double(m) + log(tail) - log_z));
  }
}

template <typename T>
cudaError_t launch(const TopkParams& p, cudaStream_t stream) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  constexpr int kPasses = topk_passes(sizeof(T), kBf16);
  const RowPlan plan = topk_plan(p.vocab, sizeof(T), kBf16, facts_for(&topk_teacher_kernel<T, kPasses>));
  const TopkLaunch L{p, plan.cache_bytes > 0};
  return launch_rows(&topk_teacher_kernel<T, kPasses>, plan, p.n, stream, L);
}

}  // namespace

cudaError_t topk_teacher(const TopkParams& p, cudaStream_t stream) {
  if (p.k < 1 || p.k > kMaxTopk) return cudaErrorInvalidValue;
  return for_dtype(p.dtype, [&](auto t) { return launch<decltype(t)>(p, stream); });
}

}  // namespace fastkd::cuda
