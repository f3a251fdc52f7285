// A CPU emulation of the part of the CUDA programming model fastkd's kernels use, so that the
// very source of kernels/*.cu runs on a machine without a GPU (tests/test_cuda_emulated.py).
// Each block runs on one OS thread, its CUDA threads as fibers (ucontext) switched at every
// barrier: __syncthreads waits for the block's fibers, a warp shuffle is an exchange through a
// buffer between two barriers of the warp's fibers. __shared__ variables are `static
// thread_local` -- one copy per block, shared by its fibers -- and dynamic shared memory is a
// buffer per block, filled with NaN. A thread-block cluster runs its blocks on concurrent OS
// threads: cluster.sync() is a barrier of theirs, map_shared_rank() the same variable in another
// block's copy. Not emulated: a real GPU's memory model and timing.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <barrier>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900  // the cluster path of kernels/rows.cuh is compiled (used when a plan asks)
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// this thread's coordinates (set by the scheduler whenever it resumes a fiber)
inline thread_local dim3 threadIdx, blockIdx, blockDim;

namespace cuda_emu {
constexpr size_t kStack = 128 * 1024;

struct Cluster;

struct Fiber {
  ucontext_t ctx;
  bool done = false;
};

// A counting barrier of `size` fibers of one block (generation-numbered).
struct FiberBarrier {
  unsigned size = 0, arrived = 0;
  unsigned long generation = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::unique_ptr<char[]> stacks;  // uninitialised: pages a fiber never touches cost nothing
  size_t stack_fibers = 0;
  ucontext_t scheduler;
  unsigned current = 0, finished = 0;
  const std::function<void()>* body = nullptr;
  FiberBarrier all;
  std::vector<FiberBarrier> warps;
  std::vector<std::array<unsigned long long, 32>> shuffle;
  std::vector<uint4> dynamic;
  unsigned rank = 0;
  Cluster* cluster = nullptr;
  char* anchor = nullptr;  // this block's thread_local storage, for map_shared_rank
};

struct Cluster {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<Block*> blocks;
};

inline thread_local Block* block = nullptr;
inline thread_local char tls_anchor;
inline unsigned long clustered_blocks = 0;  // blocks run as part of a cluster of 2 or more
inline unsigned long smem_overruns = 0;  // blocks that wrote past their dynamic shared memory
constexpr unsigned kCanary = 4;          // uint4s of canary after each block's dynamic shared memory
inline uint4 canary() { return uint4{0x0badf00du, 0xfeedfaceu, 0x0badf00du, 0xfeedfaceu}; }
inline int device = 0;  // emu_set_device: 0 an A100's shared memory, 1 almost none, 2 an H100's (clusters)

inline void yield() { swapcontext(&block->fibers[block->current].ctx, &block->scheduler); }

// Waits at `b` until all its fibers arrive; `last` runs once, in the last fiber to arrive.
template <typename F>
void wait(FiberBarrier& b, F&& last) {
  const unsigned long gen = b.generation;
  if (++b.arrived == b.size) {
    last();
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}
inline void wait(FiberBarrier& b) { wait(b, [] {}); }

inline void fiber_entry() {
  (*block->body)();
  block->fibers[block->current].done = true;
  ++block->finished;
}  // returns to the scheduler (uc_link)

// Runs `body` as blockDim.x fibers of block `index` on this OS thread.
inline void run_block(Block& b, unsigned index, const std::function<void()>& body) {
  const unsigned n = blockDim.x;
  block = &b;  // (b.anchor is set by run_grid before any block starts)
  b.body = &body;
  b.fibers.assign(n, Fiber{});
  if (b.stack_fibers < n) {
    b.stacks.reset(new char[size_t(n) * kStack]);
    b.stack_fibers = n;
  }
  b.finished = 0;
  b.all = FiberBarrier{n, 0, 0};
  b.warps.assign(n / 32, FiberBarrier{32, 0, 0});
  b.shuffle.assign(n / 32, {});
  std::fill(b.dynamic.begin(), b.dynamic.end() - kCanary, uint4{0xffc00001u, 0xffc00001u, 0xffc00001u, 0xffc00001u});
  std::fill(b.dynamic.end() - kCanary, b.dynamic.end(), canary());
  blockIdx = dim3(index);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks.get() + size_t(t) * kStack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // odd blocks resume their fibers in reverse order: a read of another thread's write that lacks a
  // barrier between them then sees the stale value in one order or the other (a racecheck of sorts)
  const bool reverse = index % 2 == 1;
  while (b.finished < n) {
    for (unsigned i = 0; i < n; ++i) {
      const unsigned t = reverse ? n - 1 - i : i;
      if (b.fibers[t].done) continue;
      b.current = t;
      threadIdx = dim3(t);
      swapcontext(&b.scheduler, &b.fibers[t].ctx);
    }
  }
  const uint4 want = canary();
  for (auto it = b.dynamic.end() - kCanary; it != b.dynamic.end(); ++it)
    if (std::memcmp(&*it, &want, sizeof(uint4)) != 0) { ++smem_overruns; break; }
}
}  // namespace cuda_emu

inline void __syncthreads() { cuda_emu::wait(cuda_emu::block->all); }

template <typename T>
T* emu_dynamic_smem() {
  return reinterpret_cast<T*>(cuda_emu::block->dynamic.data());
}

template <typename T>
T emu_shuffle(T v, int from_offset) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto& buf = cuda_emu::block->shuffle[warp];
  std::memcpy(&buf[lane], &v, sizeof(T));
  cuda_emu::wait(cuda_emu::block->warps[warp]);
  const int src = int(lane) + from_offset;
  T out = v;
  if (src >= 0 && src < 32) std::memcpy(&out, &buf[src], sizeof(T));
  cuda_emu::wait(cuda_emu::block->warps[warp]);
  return out;
}
template <typename T>
T __shfl_down_sync(unsigned, T v, int delta) { return emu_shuffle(v, delta); }
template <typename T>
T __shfl_up_sync(unsigned, T v, int delta) { return emu_shuffle(v, -delta); }

// Plain read-modify-writes: a block's fibers never run at once.
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned old = *p; *p = old + v; return old; }
inline unsigned atomicOr(unsigned* p, unsigned v) { const unsigned old = *p; *p = old | v; return old; }

namespace cooperative_groups {
struct cluster_group {
  unsigned block_rank() const { return cuda_emu::block->rank; }
  unsigned num_blocks() const { return cuda_emu::block->cluster ? unsigned(cuda_emu::block->cluster->blocks.size()) : 1u; }
  void sync() const {
    cuda_emu::Block* b = cuda_emu::block;
    if (!b->cluster) return cuda_emu::wait(b->all);
    cuda_emu::wait(b->all, [b] { b->cluster->bar->arrive_and_wait(); });  // the block's last fiber
  }
  template <typename T>
  T* map_shared_rank(T* p, unsigned rank) const {  // the same __shared__ variable, in block `rank`
    cuda_emu::Block* b = cuda_emu::block;
    return reinterpret_cast<T*>(b->cluster->blocks[rank]->anchor + (reinterpret_cast<char*>(p) - b->anchor));
  }
};
inline cluster_group this_cluster() { return {}; }
}  // namespace cooperative_groups

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }

// bf16 and fp16, rounded to nearest even like the device's conversions
struct __nv_bfloat16 {
  unsigned short bits;
};
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(unsigned(h.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  const unsigned u = __float_as_uint(f);
  if (f != f) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40)};
  return __nv_bfloat16{static_cast<unsigned short>((u + 0x7fff + ((u >> 16) & 1)) >> 16)};
}
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half(float f) { return __half{static_cast<_Float16>(f)}; }

// ---- the runtime API the entry points call ----
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension };
struct cudaLaunchAttributeValue {
  struct { unsigned x, y, z; } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};
struct cudaFuncAttributes {
  int ptxVersion, binaryVersion;
};

inline cudaError_t cudaGetDevice(int* d) { *d = cuda_emu::device; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev) {
  switch (a) {
    case cudaDevAttrComputeCapabilityMajor: *v = dev == 2 ? 9 : 8; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = dev == 0 ? 166912 : dev == 1 ? 4096 : 232448; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = dev == 0 ? 167936 : dev == 1 ? 4096 : 233472; break;
  }
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->ptxVersion = a->binaryVersion = 90;
  return cudaSuccess;
}

namespace cuda_emu {
// Blocks run cluster by cluster; a cluster's blocks on concurrent OS threads, one each.
inline cudaError_t run_grid(const cudaLaunchConfig_t& c, const std::function<void()>& body) {
  unsigned size = 1;
  for (unsigned i = 0; i < c.numAttrs; ++i)
    if (c.attrs[i].id == cudaLaunchAttributeClusterDimension) size = c.attrs[i].val.clusterDim.x;
  if (c.blockDim.x % 32 != 0 || size == 0 || c.gridDim.x % size != 0) return cudaErrorInvalidValue;
  if (size > 1) clustered_blocks += c.gridDim.x;
  for (unsigned first = 0; first < c.gridDim.x; first += size) {
    Cluster cluster;
    cluster.bar = std::make_unique<std::barrier<>>(size);
    std::vector<std::unique_ptr<Block>> blocks;
    for (unsigned r = 0; r < size; ++r) {
      blocks.push_back(std::make_unique<Block>());
      blocks.back()->rank = r;
      blocks.back()->cluster = size > 1 ? &cluster : nullptr;
      blocks.back()->dynamic.resize((c.dynamicSmemBytes + 15) / 16 + kCanary);
      cluster.blocks.push_back(blocks.back().get());
    }
    std::barrier<> started(size);  // every block's anchor is known before any maps another's
    std::vector<std::thread> threads;
    for (unsigned r = 0; r < size; ++r) {
      threads.emplace_back([&, r] {
        blockDim = c.blockDim;
        blocks[r]->anchor = &tls_anchor;
        started.arrive_and_wait();
        run_block(*blocks[r], first + r, body);
      });
    }
    for (auto& t : threads) t.join();
  }
  return cudaSuccess;
}
}  // namespace cuda_emu

template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  return cuda_emu::run_grid(*config, [&] { kernel(args...); });
}
