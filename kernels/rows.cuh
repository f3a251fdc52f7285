// kernels/rows.cuh -- the row machinery every CUDA kernel shares: element types and
// 16-byte vector loads, walks over a block's slice of a row (from global memory, optionally
// caching it in shared memory, or from that cache), online max/sum-of-exp2 states, and their
// reductions across a warp (shuffles), a block (shared memory) and a thread-block cluster
// (distributed shared memory, sm_90+). CUDA headers and csrc/kd_math.h only: no torch.
//
// Units: a row's values enter the online states in log2 units (x * log2(e) / T), so every
// exponential is one exp2; log-sum-exps leave in natural units (times ln 2).
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kd_math.h"
#include "launch.h"
#include "plan.h"

namespace fastkd::cuda {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// ---- element types --------------------------------------------------------------------------

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// The kept gradient's type: the logits', float for half (fastkd/_ops.py grad_dtype).
template <typename T> struct GradOf { using type = T; };
template <> struct GradOf<__half> { using type = float; };
template <typename T> using grad_t = typename GradOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }

template <typename G> __device__ __forceinline__ G from_acc(float x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <typename G> __device__ __forceinline__ G from_acc(double x) { return G(x); }

__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }

template <typename A> __device__ __forceinline__ A neg_inf() { return A(-INFINITY); }

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

// Whether p is 16-byte aligned.
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ---- walks over a block's slice [lo, hi) of a row ---------------------------------------------
//
// Each calls f(j, x...) once per column j of the slice, spread over the block's threads, with
// x the column's values in the accumulation type. Where every row pointer is 16-byte aligned
// (and lo a multiple of the vector width) the columns come in 16-byte vectors, thread i taking
// vectors i, i + blockDim, ...; else one column at a time.

template <typename T>
struct Pack {
  static constexpr int n = kVec<T>;
  uint4 raw;
  __device__ __forceinline__ acc_t<T> operator[](int i) const { return to_acc(reinterpret_cast<const T*>(&raw)[i]); }
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  Pack<T> v;
  v.raw = *reinterpret_cast<const uint4*>(p);
  return v;
}

// Loads of one or two row arrays (student, teacher), optionally storing the raw values to a
// shared-memory cache of the slice (cache + (j - lo)); src may itself be that cache.
template <typename T, int kArrays>
struct RowSource {
  const T* src[kArrays];   // row pointers, indexed by column j
  T* cache[kArrays];       // null, or the slice cache to fill, indexed by j - lo
};

// f(j, x...) for the values x[0..kArrays) of column j.
template <int kArrays, typename A, typename F>
__device__ __forceinline__ auto call(F& f, int64_t j, const A (&x)[kArrays]) {
  if constexpr (kArrays == 1) return f(j, x[0]);
  else return f(j, x[0], x[1]);
}

// The one walk: with G = void it only calls f; else it writes out[j] = f(j, x...) in G (16-byte
// stores where vec).
template <typename G, typename T, int kArrays, typename F>
__device__ __forceinline__ void walk_row(const RowSource<T, kArrays>& rs, G* out, int64_t lo, int64_t hi, bool vec,
                                         F& f) {
  constexpr int V = kVec<T>;
  constexpr bool kStore = !std::is_void_v<G>;
  int64_t j0 = lo;
  if (vec) {
    const int64_t packs = (hi - lo) / V;
    for (int64_t q = threadIdx.x; q < packs; q += blockDim.x) {
      const int64_t j = lo + q * V;
      Pack<T> x[kArrays];
#pragma unroll
      for (int a = 0; a < kArrays; ++a) {
        x[a] = load_pack(rs.src[a] + j);
        if (rs.cache[a]) *reinterpret_cast<uint4*>(rs.cache[a] + (j - lo)) = x[a].raw;
      }
      constexpr int kStores = kStore ? V * sizeof(std::conditional_t<kStore, G, char>) / 16 : 1;
      [[maybe_unused]] uint4 o[kStores];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        acc_t<T> v[kArrays];
#pragma unroll
        for (int a = 0; a < kArrays; ++a) v[a] = x[a][i];
        if constexpr (kStore) reinterpret_cast<G*>(o)[i] = from_acc<G>(call<kArrays>(f, j + i, v));
        else call<kArrays>(f, j + i, v);
      }
      if constexpr (kStore) {
        static_assert((V * sizeof(G)) % 16 == 0, "a vector of outputs must be whole 16-byte stores");
#pragma unroll
        for (int s = 0; s < kStores; ++s) reinterpret_cast<uint4*>(out + j)[s] = o[s];
      }
    }
    j0 = lo + packs * V;
  }
  for (int64_t j = j0 + threadIdx.x; j < hi; j += blockDim.x) {
    acc_t<T> v[kArrays];
#pragma unroll
    for (int a = 0; a < kArrays; ++a) {
      const T raw = rs.src[a][j];
      if (rs.cache[a]) rs.cache[a][j - lo] = raw;
      v[a] = to_acc(raw);
    }
    if constexpr (kStore) out[j] = from_acc<G>(call<kArrays>(f, j, v));
    else call<kArrays>(f, j, v);
  }
}

// f(j, x...) for every column of the slice (filling rs.cache where set).
template <typename T, int kArrays, typename F>
__device__ __forceinline__ void walk(const RowSource<T, kArrays>& rs, int64_t lo, int64_t hi, bool vec, F&& f) {
  walk_row<void>(rs, static_cast<void*>(nullptr), lo, hi, vec, f);
}

// out[j] = f(j, x...) for every column of the slice.
template <typename T, int kArrays, typename G, typename F>
__device__ __forceinline__ void walk_store(const RowSource<T, kArrays>& rs, G* out, int64_t lo, int64_t hi,
                                           bool vec, F&& f) {
  walk_row<G>(rs, out, lo, hi, vec, f);
}

// Fills out[lo:hi) with v.
template <typename G, typename A>
__device__ __forceinline__ void fill_row(G* out, int64_t lo, int64_t hi, A v) {
  const G g = from_acc<G>(v);
  for (int64_t j = lo + threadIdx.x; j < hi; j += blockDim.x) out[j] = g;
}

// A row-loss kernel's (dense_kd, sparse_kd) row: *label (-1 without labels) and *bad_label, a kept
// label outside [0, V) (no host check on CUDA: the row is NaN instead). Returns false for an
// ignored row, whose loss (the lead thread's) and gradient slice it zeroes; every block of a
// cluster returns alike, before any cluster barrier.
template <typename A, typename G>
__device__ __forceinline__ bool kept_row(const RowLossParams& p, int64_t row, int64_t lo, int64_t hi, bool lead,
                                         G* g, int64_t* label, bool* bad_label) {
  *label = p.labels ? p.labels[row] : -1;
  *bad_label = false;
  if (!p.labels) return true;
  if (*label == p.ignore_index) {
    if (lead) static_cast<A*>(p.loss)[row] = A(0);
    if (g) fill_row(g, lo, hi, A(0));
    return false;
  }
  *bad_label = *label < 0 || *label >= p.vocab;
  return true;
}

// The hard-label term's gradient at column j: w_hard (softmax(s)_j - [j == label]) at temperature
// 1, lse_1 = log2 sum exp(s); 0 without hard labels.
template <typename A>
__device__ __forceinline__ A hard_label_grad(const RowLossParams& p, int64_t j, A x, int64_t label, A lse_1) {
  return p.hard ? A(p.w.hard_grad_weight) * (exp2_(x * A(kLog2e) - lse_1) - (j == label ? A(1) : A(0))) : A(0);
}

// ---- online max / sum of exp2 -----------------------------------------------------------------

// The running maximum m of values x (log2 units) and s = sum exp2(x - m); with r = sum exp2(x - m)
// w_x for weights w folded in at the same scale when asked. Empty: m = -inf, s = r = 0. A NaN x
// makes s NaN; a +inf x makes m +inf (callers test both: a NaN row, docs/math.md).
template <typename A>
struct MaxSum {
  A m, s, r;
  __device__ __forceinline__ static MaxSum empty() { return MaxSum{neg_inf<A>(), A(0), A(0)}; }
  __device__ __forceinline__ void add(A x, A w = A(0)) {
    if (x > m) {  // a new maximum (never for NaN)
      const A f = exp2_(m - x);  // 0 when m = -inf
      s = s * f + A(1);
      r = r * f + w;
      m = x;
    } else if (x != neg_inf<A>()) {  // a NaN x poisons s here
      const A e = exp2_(x - m);
      s += e;
      r += e * w;
    }
  }
  // the log2 of the sum: m + log2(s), -inf when empty
  __device__ __forceinline__ A log2_total() const { return m == neg_inf<A>() ? m : m + log2_(s); }
  __device__ __forceinline__ bool poisoned() const { return s != s || m == A(INFINITY); }
};

template <typename A>
__device__ __forceinline__ MaxSum<A> combine(const MaxSum<A>& x, const MaxSum<A>& y) {
  const A m = x.m > y.m ? x.m : y.m;
  if (m == neg_inf<A>()) return MaxSum<A>{m, x.s + y.s, x.r + y.r};  // (NaN sums stay NaN)
  const A fx = x.m == neg_inf<A>() ? A(0) : exp2_(x.m - m);
  const A fy = y.m == neg_inf<A>() ? A(0) : exp2_(y.m - m);
  return MaxSum<A>{m, x.s * fx + y.s * fy, x.r * fx + y.r * fy};
}

// ---- reductions: warp, block, cluster ---------------------------------------------------------

// A trivially copyable value shuffled down a warp as 32-bit words.
template <typename T>
__device__ __forceinline__ T shfl_down(const T& v, int delta) {
  static_assert(sizeof(T) % 4 == 0, "shuffled values are whole 32-bit words");
  T out;
  const unsigned* src = reinterpret_cast<const unsigned*>(&v);
  unsigned* dst = reinterpret_cast<unsigned*>(&out);
#pragma unroll
  for (int i = 0; i < int(sizeof(T) / 4); ++i) dst[i] = __shfl_down_sync(0xffffffffu, src[i], delta);
  return out;
}

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v = op(v, shfl_down(v, d));
  return v;  // lane 0 holds the warp's result
}

// The block's reduction of every thread's v, returned to every thread. scratch: 33 Ts of shared
// memory (one per warp, one for the result), reusable once this returns to all threads.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {  // the warps' results, in warp order
    T acc = scratch[0];
    for (int i = 1; i < warps; ++i) acc = op(acc, scratch[i]);
    scratch[32] = acc;
  }
  __syncthreads();
  const T out = scratch[32];
  __syncthreads();  // scratch may be reused by the caller's next reduction
  return out;
}

// This block's place in its row: the cluster rank and size (1 without a cluster).
struct ClusterPos {
  unsigned rank, size;
};

__device__ __forceinline__ ClusterPos cluster_pos() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const auto c = cg::this_cluster();
  return ClusterPos{c.block_rank(), c.num_blocks()};
#else
  return ClusterPos{0u, 1u};
#endif
}

// The reduction of block_value (already reduced over this block, the same in every thread) over
// the row's cluster, in rank order, returned to every thread of every block of the cluster.
// `slot` is a __shared__ T used by this one call site only (other blocks read it remotely, so it
// must not be rewritten before cluster_done).
template <typename T, typename Op>
__device__ __forceinline__ T cluster_reduce(const T& block_value, Op op, T* slot, T* result) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  auto c = cg::this_cluster();
  const unsigned n = c.num_blocks();
  if (n == 1) return block_value;
  if (threadIdx.x == 0) *slot = block_value;
  c.sync();  // every block's slot written and visible
  if (threadIdx.x == 0) {
    T acc = *c.map_shared_rank(slot, 0);
    for (unsigned r = 1; r < n; ++r) acc = op(acc, *c.map_shared_rank(slot, r));
    *result = acc;
  }
  __syncthreads();
  return *result;
#else
  (void)op; (void)slot; (void)result;
  return block_value;
#endif
}

// Before a block of a cluster exits: no other block still reads its shared memory.
__device__ __forceinline__ void cluster_done() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  auto c = cg::this_cluster();
  if (c.num_blocks() > 1) c.sync();
#endif
}

template <typename A>
struct Add {
  __device__ __forceinline__ A operator()(const A& x, const A& y) const { return x + y; }
};

// ---- host side: device facts and launches -----------------------------------------------------

// f(T{}) for the logits' element type T of `dtype` (an entry point's dispatch).
template <typename F>
cudaError_t for_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// The current device's index, for the per-device caches below (at most 64 devices).
inline int current_device() {
  int dev = 0;
  return cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64 ? dev : 0;
}

// The facts of the current device, read once per device.
inline DeviceFacts device_facts() {
  static DeviceFacts facts[64];
  static bool known[64] = {};
  const int dev = current_device();
  if (!known[dev]) {
    int major = 0, optin = 0, per_sm = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    facts[dev] = DeviceFacts{major, optin, per_sm};
    known[dev] = true;
  }
  return facts[dev];
}

// The facts a plan for `kernel` may use: the device's, its compute capability capped at the
// architecture the kernel was compiled for (an sm_80 build JIT-run on an H100 has no cluster code:
// its blocks would each take the whole row). Read once per kernel signature and device (one
// build compiles every kernel of an op for the same architectures).
template <typename... KArgs>
DeviceFacts facts_for(void (*kernel)(KArgs...)) {
  static int built_major[64];
  static bool known[64] = {};
  const int dev = current_device();
  if (!known[dev]) {
    cudaFuncAttributes attr;
    built_major[dev] = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess
                           ? (attr.ptxVersion < attr.binaryVersion ? attr.ptxVersion : attr.binaryVersion) / 10
                           : 0;
    known[dev] = true;
  }
  DeviceFacts facts = device_facts();
  if (built_major[dev] < facts.sm_major) facts.sm_major = built_major[dev];
  return facts;
}

// Launches kernel<<<grid, plan.threads, plan.cache_bytes, stream>>>(args...) as clusters of
// plan.cluster blocks along x when plan.cluster > 1 (sm_90+), raising the kernel's dynamic
// shared-memory limit first when the plan needs more than the default 48 KiB.
template <typename... KArgs, typename... Args>
cudaError_t launch_rows(void (*kernel)(KArgs...), const RowPlan& plan, int64_t rows, cudaStream_t stream,
                        Args&&... args) {
  if (rows == 0) return cudaSuccess;
  if (plan.cache_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(plan.cache_bytes));
    if (e != cudaSuccess) return e;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * plan.cluster), 1, 1);
  config.blockDim = dim3(static_cast<unsigned>(plan.threads), 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(plan.cache_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (plan.cluster > 1) {
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  return cudaLaunchKernelEx(&config, kernel, static_cast<KArgs>(args)...);
}

}  // namespace fastkd::cuda
