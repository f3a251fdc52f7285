// A CPU emulation of the part of the CUDA programming model fastkd's kernels use, so that the
// very source of kernels/*.cu runs on a machine without a GPU (tests/test_cuda_emulated.py). A
// grid runs one block at a time on one set of std::threads (a block's threads); __syncthreads is a barrier
// of the block, a warp shuffle an exchange through a buffer between two barriers of the warp;
// __shared__ variables are statics (one block at a time shares them) and dynamic shared memory a
// buffer per block. Not emulated: thread-block clusters (the host reports compute capability 8,
// so the plans never ask for them), the memory model of a real GPU, timing.
#pragma once

#include <algorithm>
#include <atomic>
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

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

namespace cuda_emu {
struct Warp {
  std::barrier<> bar{32};
  alignas(8) unsigned char buf[32][8];
};
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<uint4> dynamic;
};
inline thread_local Block* block = nullptr;
inline int device = 0;  // emu_set_device: 0 has an A100's shared memory, 1 almost none
}  // namespace cuda_emu

// this thread's coordinates (thread-local globals, as the kernels name them)
inline thread_local dim3 threadIdx, blockIdx, blockDim;

inline void __syncthreads() { cuda_emu::block->bar->arrive_and_wait(); }

template <typename T>
T* emu_dynamic_smem() {
  return reinterpret_cast<T*>(cuda_emu::block->dynamic.data());
}

template <typename T>
T emu_shuffle(T v, int from_offset) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  const int lane = threadIdx.x & 31;
  cuda_emu::Warp& w = *cuda_emu::block->warps[threadIdx.x >> 5];
  std::memcpy(w.buf[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  const int src = lane + from_offset;
  T out = v;
  if (src >= 0 && src < 32) std::memcpy(&out, w.buf[src], sizeof(T));
  w.bar.arrive_and_wait();
  return out;
}
template <typename T>
T __shfl_down_sync(unsigned, T v, int delta) { return emu_shuffle(v, delta); }
template <typename T>
T __shfl_up_sync(unsigned, T v, int delta) { return emu_shuffle(v, -delta); }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }

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
    case cudaDevAttrComputeCapabilityMajor: *v = 8; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = dev == 0 ? 166912 : 4096; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = dev == 0 ? 167936 : 4096; break;
  }
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
template <typename F>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  a->ptxVersion = a->binaryVersion = 80;
  return cudaSuccess;
}

namespace cuda_emu {
inline cudaError_t run_grid(const cudaLaunchConfig_t& c, const std::function<void()>& body) {
  if (c.numAttrs != 0 || c.blockDim.x % 32 != 0) return cudaErrorInvalidValue;  // no clusters here
  // one set of threads runs the blocks in turn; between blocks, fresh (garbage-filled) dynamic
  // shared memory, so a kernel that reads what it did not write shows it
  Block blk;
  blk.bar = std::make_unique<std::barrier<>>(c.blockDim.x);
  for (unsigned w = 0; w < c.blockDim.x / 32; ++w) blk.warps.push_back(std::make_unique<Warp>());
  const uint4 garbage{0xffc00001u, 0xffc00001u, 0xffc00001u, 0xffc00001u};  // NaN as float
  blk.dynamic.assign((c.dynamicSmemBytes + 15) / 16 + 1, garbage);
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < c.blockDim.x; ++t) {
    threads.emplace_back([&, t] {
      block = &blk;
      threadIdx = dim3(t);
      blockDim = c.blockDim;
      for (unsigned b = 0; b < c.gridDim.x; ++b) {
        blockIdx = dim3(b);
        body();
        blk.bar->arrive_and_wait();
        if (t == 0) std::fill(blk.dynamic.begin(), blk.dynamic.end(), garbage);
        blk.bar->arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
  return cudaSuccess;
}
}  // namespace cuda_emu

template <typename... ExpTypes, typename... ActTypes>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(ExpTypes...), ActTypes&&... args) {
  return cuda_emu::run_grid(*config, [&] { kernel(args...); });
}
