// kernels/plan.h -- how the CUDA row kernels split a row over the GPU, chosen on the host.
//
// Plain C++ (no CUDA or torch header): kernels/*.cu call it at launch, and fastkd._C exposes it
// to Python (fastkd._C.cuda_plan) on every build, so docs/backends.md's table of choices per
// (V, dtype, arch) is printed from this very function and tested against it on machines without
// a GPU.
//
// A row kernel keeps the part of a row it owns in shared memory when it fits ("cached"): then the
// inputs cross HBM once and every later pass reads shared memory. On sm_90 a row too long for
// one block is split over a thread-block cluster of 2, 4 or 8 blocks, each caching its slice,
// which combine their row statistics through distributed shared memory: still one read. On sm_90
// the kernel also splits a row that would fit one block when that keeps two blocks per SM (one
// block's loads then overlap the other's arithmetic). Elsewhere a row too long for one block is
// re-read from global memory (L2) by each later pass.
#pragma once

#include <cstdint>
#include <cstdlib>

namespace fastkd::cuda {

struct RowPlan {
  int threads;          // per block
  int cluster;          // blocks per row: a thread-block cluster (sm_90+) when > 1
  int64_t slice;        // columns each block owns (a multiple of the 16-byte vector width)
  int64_t cache_bytes;  // dynamic shared memory per block for the cached slice; 0: not cached
  int reads;            // times the kernel reads the inputs from global memory (1 when cached)
};

// The device facts a plan depends on.
struct DeviceFacts {
  int sm_major;             // compute capability major (8: A100, 9: H100/H200, 10: B200)
  int64_t smem_block_optin; // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int64_t smem_per_sm;      // cudaDevAttrMaxSharedMemoryPerMultiprocessor
};

// A block's threads, at most, by the logits' element size, and the blocks an SM must hold: the
// kernels' __launch_bounds__(max_threads(sizeof(T)), kMinBlocksPerSm), which caps a thread's
// registers at 64 (fp64: 128) so two blocks of the largest size always fit. Without the second
// bound ptxas chose 32 registers and spilled (sample_teacher_draws, 16/32-bit) or 82-84 and fit one
// 512-thread fp64 block; `make cuda-check` reports each kernel's registers and spills
// (docs/kernel-resources.md) and fails on a spill.
constexpr int kMaxThreads = 512;
constexpr int kMaxThreadsFp64 = 256;
constexpr int kMinBlocksPerSm = 2;
constexpr int max_threads(int elem_bytes) { return elem_bytes == 8 ? kMaxThreadsFp64 : kMaxThreads; }
constexpr int kMaxCluster = 8;    // the portable cluster size
// Static shared memory every row kernel keeps besides the cache (reduction scratch); an op's own
// extra (sparse_kd's id bitmap, topk_teacher's kept entries) comes on top, row_plan's `extra`.
constexpr int64_t kReserveBytes = 4096;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A plan for rows of `vocab` columns whose cached slice takes `bytes_per_col` bytes of shared
// memory a column (dense_kd: student and teacher, 2 * element size; sparse_kd, topk_teacher,
// sample_teacher_draws: one row, the element size), `vec` elements per 16-byte load, `extra`
// bytes of shared memory per block besides the cache, `reread` global reads for an uncached row,
// and whether the kernel can split a row over a cluster. FASTKD_CUDA_CLUSTER=c (1, 2, 4, 8) forces
// the cluster size on sm_90 (for tuning; 1 turns clusters off).
inline RowPlan row_plan(int64_t vocab, int64_t bytes_per_col, int vec, int64_t extra, int reread,
                        bool clusters, const DeviceFacts& dev) {
  const bool sm90 = clusters && dev.sm_major >= 9;
  int forced = 0;
  if (const char* env = std::getenv("FASTKD_CUDA_CLUSTER")) forced = std::atoi(env);
  auto slice_of = [&](int c) { return round_up((vocab + c - 1) / c, vec); };
  auto bytes_of = [&](int c) { return slice_of(c) * bytes_per_col; };
  const int64_t budget = dev.smem_block_optin - extra - kReserveBytes;
  const int64_t half_sm = dev.smem_per_sm / 2 - extra - kReserveBytes - 1024;
  int cluster = 0;
  if (sm90 && (forced == 1 || forced == 2 || forced == 4 || forced == 8)) {
    cluster = bytes_of(forced) <= budget ? forced : 0;
    if (cluster == 0) cluster = -forced;  // forced, but its slice does not fit: uncached
  } else if (sm90) {
    for (int c = 1; c <= kMaxCluster && cluster == 0; c *= 2)
      if (bytes_of(c) <= half_sm) cluster = c;
    for (int c = 1; c <= kMaxCluster && cluster == 0; c *= 2)
      if (bytes_of(c) <= budget) cluster = c;
  } else if (bytes_of(1) <= budget) {
    cluster = 1;
  }
  RowPlan plan;
  const bool cached = cluster > 0;
  plan.cluster = cluster > 0 ? cluster : (cluster < 0 ? -cluster : 1);
  plan.slice = slice_of(plan.cluster);
  plan.cache_bytes = cached ? bytes_of(plan.cluster) : 0;
  plan.reads = cached ? 1 : reread;
  // enough threads for about two 16-byte loads each per slice, a whole number of warps
  int threads = 128;
  while (threads < max_threads(16 / vec) && threads * vec * 2 < plan.slice) threads *= 2;
  plan.threads = threads;
  return plan;
}

// The ops' plans (elem_bytes: the logits' element size).
//   dense_kd: student and teacher cached; uncached, forward KL reads them twice, the other
//     divergences three times (their gradient needs U = sum u first)
//   sparse_kd: the student cached beside a bitmap of the row's teacher ids; uncached, read twice
//   topk_teacher, sample_teacher_draws: one block per row (no cluster), the row cached as fp32;
//     uncached, read `passes` times: topk_teacher's radix passes and its gather, sampling's three
inline RowPlan dense_plan(int64_t vocab, int elem_bytes, bool forward_kl, const DeviceFacts& dev) {
  return row_plan(vocab, 2 * elem_bytes, 16 / elem_bytes, 0, forward_kl ? 2 : 3, true, dev);
}
inline int64_t sparse_bitmap_bytes(int64_t slice) { return round_up(slice, 32) / 8; }
// (the extra is the bitmap of a whole row: an upper bound on any slice's)
inline RowPlan sparse_plan(int64_t vocab, int elem_bytes, const DeviceFacts& dev) {
  return row_plan(vocab, elem_bytes, 16 / elem_bytes, sparse_bitmap_bytes(vocab), 2, true, dev);
}
// topk_teacher's radix passes of 8 bits over its 32-bit keys: a bf16 key has 16 significant bits,
// an fp16 one 19, fp32 and fp64 (selected as fp32) 32.
constexpr int topk_passes(int elem_bytes, bool bf16) { return elem_bytes == 2 ? (bf16 ? 2 : 3) : 4; }

// (topk_teacher's kept entries, value and id, and histogram live in static shared memory)
constexpr int64_t kTeacherStaticBytes = 1024 * 8 + 2048;
inline RowPlan teacher_plan(int64_t vocab, int elem_bytes, int passes, const DeviceFacts& dev) {
  return row_plan(vocab, 4, 16 / elem_bytes, kTeacherStaticBytes, passes, false, dev);
}
inline RowPlan topk_plan(int64_t vocab, int elem_bytes, bool bf16, const DeviceFacts& dev) {
  return teacher_plan(vocab, elem_bytes, topk_passes(elem_bytes, bf16) + 1, dev);
}
inline RowPlan sample_plan(int64_t vocab, int elem_bytes, const DeviceFacts& dev) {
  return teacher_plan(vocab, elem_bytes, 3, dev);
}

}  // namespace fastkd::cuda
