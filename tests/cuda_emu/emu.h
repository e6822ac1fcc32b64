// emu.h — run csrc/*.cu kernels on the CPU, for tests on machines without a GPU.
//
// Force-included (g++ -include emu.h -DMMK_HOST_EMULATION -x c++ csrc/X.cu) in front of a .cu
// file.  Every CUDA thread of a block is a std::thread; blocks run one after the other, so
// `__shared__` variables become plain statics (one copy, shared by the block's threads) and the
// dynamic shared memory one buffer.  __syncthreads is a std::barrier over the block,
// __shfl_xor_sync an exchange through a per-warp buffer between two warp barriers (valid when
// all 32 lanes call it, as the kernels do).  Timing, occupancy, memory coalescing and races
// between blocks are not modelled: this checks index math and numerics, not performance.
#pragma once

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace mmk_emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  explicit Warp(int lanes) : bar(lanes) {}
  std::barrier<> bar;
  float buf[32] = {};
};

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;
};

inline Block& block() {
  static Block b;
  return b;
}

inline thread_local Dim t_thread, t_block, t_bdim, t_gdim;

template <typename T>
inline T* dyn_smem() {
  return reinterpret_cast<T*>(block().smem.data());
}

inline void syncthreads() { block().bar->arrive_and_wait(); }

inline float shfl_xor(float v, int mask) {
  const unsigned lane = t_thread.x & 31;
  Warp& w = *block().warps[t_thread.x >> 5];
  w.buf[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.buf[lane ^ static_cast<unsigned>(mask)];
  w.bar.arrive_and_wait();
  return r;
}

// kernel<<<grid, threads, smem>>>(args...): `threads` std::threads, each looping over the grid.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), unsigned grid, int threads, size_t smem, Args... args) {
  Block& b = block();
  b.bar = std::make_unique<std::barrier<>>(threads);
  b.warps.clear();
  for (int i = 0; i < (threads + 31) / 32; ++i)
    b.warps.push_back(std::make_unique<Warp>(std::min(32, threads - 32 * i)));
  b.smem.assign(smem + 16, 0xff);  // garbage-filled, like real shared memory
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([=, &b]() {
      t_thread.x = static_cast<unsigned>(t);
      t_bdim.x = static_cast<unsigned>(threads);
      t_gdim.x = grid;
      for (unsigned blk = 0; blk < grid; ++blk) {
        t_block.x = blk;
        kernel(static_cast<KArgs>(args)...);
        b.bar->arrive_and_wait();  // the next block starts when every thread is done
      }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace mmk_emu

#define threadIdx (mmk_emu::t_thread)
#define blockIdx (mmk_emu::t_block)
#define blockDim (mmk_emu::t_bdim)
#define gridDim (mmk_emu::t_gdim)
#define MMK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), mmk_emu::launch(kernel, grid, block, smem, __VA_ARGS__))

inline void __syncthreads() { mmk_emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) { return mmk_emu::shfl_xor(v, mask); }
inline uint4 __ldg(const uint4* p) { return *p; }
inline uint2 __ldg(const uint2* p) { return *p; }
inline float4 __ldg(const float4* p) { return *p; }
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
using std::isnan;
using std::max;
using std::min;

// The runtime calls the launchers make (the C API under cuda_runtime.h's template wrappers),
// answered for one fake device with 4 SMs and 2 resident blocks per SM, so the norm backward's
// row loop and partial sums run with several blocks.  Defined here, not in libcudart: the
// emulation links no CUDA library (include this header in one translation unit only).
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr, int) {
  *v = 4;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int, size_t) {
  *n = 2;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, const void*, int, size_t,
                                                                   unsigned int) {
  *n = 2;
  return cudaSuccess;
}
}
