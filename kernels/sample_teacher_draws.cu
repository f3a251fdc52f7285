// kernels/sample_teacher_draws.cu -- backend "cuda" of the op sample_teacher_draws
// (fastkd/_ops.py): sampled KD's draws by inverse CDF, like every backend, so one generator's
// uniforms give the same draws on each (the uniforms come from the caller's generator -- Philox,
// seed and offset, on CUDA -- sorted per row by fastkd.sample_teacher).
//
// One block per row; the row is read once and kept in shared memory (as a = t / T, fp32) when it
// fits (kernels/plan.h), else read again by each pass:
//   1. the maximum m of a
//   2. Z = sum exp(a - m) in fp64, and the last id of positive mass
//   3. the running sum, a tile of the row at a time: each thread owns a run of columns and the
//      interval [P_t, P_t+1) of the running sum that its columns cover (P from one block scan, so
//      the intervals tile [0, total) exactly); it places the targets u * Z that fall in its interval
//      by walking its columns. Targets at or past the total (rounding) take the last id of
//      positive mass; a row with no finite logit is -1 throughout.
#include "rows.cuh"

namespace fastkd::cuda {
namespace {

constexpr int kRun = 8;  // columns per thread per tile of the scan

struct SampleLaunch {
  SampleParams p;
  bool cached;
};

// The exclusive and inclusive block scan of each thread's v, offset by base: [*lo, *hi) is this
// thread's interval, and every thread's *hi is the next thread's *lo, bit for bit. Returns the
// last thread's *hi (the new base). scratch: 33 doubles.
__device__ __forceinline__ double block_scan(double v, double base, double* lo, double* hi, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  double inc = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const double up = __shfl_up_sync(0xffffffffu, inc, d);
    if (lane >= d) inc += up;
  }
  double exc = __shfl_up_sync(0xffffffffu, inc, 1);
  if (lane == 0) exc = 0;
  if (lane == 31) scratch[warp] = inc;
  __syncthreads();
  if (threadIdx.x == 0) {  // the warps' offsets, exclusive, in place; the block's total after them
    double run = 0;
    for (int w = 0; w < warps; ++w) {
      const double t = scratch[w];
      scratch[w] = run;
      run = run + t;
    }
  }
  __syncthreads();
  const double offset = scratch[warp];
  *lo = base + (offset + exc);
  *hi = base + (offset + inc);
  __shared__ double last_hi;
  if (threadIdx.x == blockDim.x - 1) last_hi = *hi;
  __syncthreads();
  const double next = last_hi;
  __syncthreads();  // scratch and last_hi may be rewritten by the next tile
  return next;
}

template <typename T>
__global__ void __launch_bounds__(max_threads(sizeof(T)), kMinBlocksPerSm) sample_teacher_draws_kernel(const SampleLaunch L) {
  __shared__ float scratch_max[33];
  __shared__ double scratch_sum[33];
  __shared__ long long scratch_last[33];
  __shared__ double scratch_scan[33];
  extern __shared__ uint4 smem_raw[];

  const SampleParams& p = L.p;
  const int64_t row = blockIdx.x, V = p.vocab, S = p.s;
  const T* x_row = static_cast<const T*>(p.logits) + row * p.stride;
  const double* u = p.uniforms + row * S;
  int64_t* out = p.draws + row * S;
  float* cache = L.cached ? reinterpret_cast<float*>(smem_raw) : nullptr;
  const float inv_t = float(p.inv_temperature);

  // 1. the maximum (the row cached on the way)
  float mx = -INFINITY;
  walk(RowSource<T, 1>{{x_row}, {nullptr}}, 0, V, aligned16(x_row), [&](int64_t j, acc_t<T> x) {
    const float a = float(x) * inv_t;
    if (cache) cache[j] = a;
    mx = a > mx || a != a ? a : mx;  // a NaN stays
  });
  const float m = block_reduce(mx, [](float a, float b) { return a > b || a != a ? a : b; }, scratch_max);
  if (m == -INFINITY) {  // nothing to draw
    for (int64_t c = threadIdx.x; c < S; c += blockDim.x) out[c] = -1;
    return;
  }
  auto mass = [&](int64_t j) {  // exp(a_j - m), the same bits in every pass
    const float a = cache ? cache[j] : float(to_acc(x_row[j])) * inv_t;
    return a == -INFINITY ? 0.0f : exp2_((a - m) * float(kLog2e));
  };

  // 2. the total and the last id of positive mass
  double z = 0;
  long long last = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float e = mass(j);
    z += double(e);
    if (e > 0) last = j;
  }
  z = block_reduce(z, Add<double>{}, scratch_sum);
  last = block_reduce(last, [](long long a, long long b) { return a > b ? a : b; }, scratch_last);

  // 3. the running sum, tile by tile; each thread places the targets in its interval
  double base = 0;
  const int64_t tile = int64_t(blockDim.x) * kRun;
  for (int64_t t0 = 0; t0 < V; t0 += tile) {
    const int64_t j0 = t0 + int64_t(threadIdx.x) * kRun, j1 = min(V, j0 + kRun);
    double own = 0;
    for (int64_t j = j0; j < j1; ++j) own += double(mass(j));
    double lo, hi;
    base = block_scan(own, base, &lo, &hi, scratch_scan);
    if (!(hi > lo)) continue;
    int64_t c0 = 0, c1 = S;  // the first target >= lo
    while (c0 < c1) {
      const int64_t mid = (c0 + c1) / 2;
      if (u[mid] * z < lo) c0 = mid + 1; else c1 = mid;
    }
    int64_t c = c0, pos = j0;
    double run = lo;
    for (int64_t j = j0; j < j1 && c < S; ++j) {
      const float e = mass(j);
      if (e == 0) continue;
      run += double(e);
      pos = j;
      while (c < S && u[c] * z < run && u[c] * z < hi) out[c++] = j;
    }
    while (c < S && u[c] * z < hi) out[c++] = pos;  // the interval's end, lost to rounding in run
  }
  // targets at or past the total (or NaN, for a NaN row: fastkd.sample_teacher marks it)
  for (int64_t c = threadIdx.x; c < S; c += blockDim.x)
    if (!(u[c] * z < base)) out[c] = last;
}

template <typename T>
cudaError_t launch(const SampleParams& p, cudaStream_t stream) {
  const RowPlan plan = sample_plan(p.vocab, sizeof(T), facts_for(&sample_teacher_draws_kernel<T>));
  const SampleLaunch L{p, plan.cache_bytes > 0};
  return launch_rows(&sample_teacher_draws_kernel<T>, plan, p.n, stream, L);
}

}  // namespace

cudaError_t sample_teacher_draws(const SampleParams& p, cudaStream_t stream) {
  return for_dtype(p.dtype, [&](auto t) { return launch<decltype(t)>(p, stream); });
}

}  // namespace fastkd::cuda
