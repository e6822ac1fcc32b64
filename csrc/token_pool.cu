// token_pool.cu — fused visual-token pooling (avg / max / bilinear / merge + LayerNorm/RMSNorm)
// straight from the (B, N, C) token layout: kernels and their launchers.
//
// Only CUDA headers here (no torch): the file compiles in seconds for sm_80 + sm_90, where one
// that includes torch/extension.h takes minutes on the 2-core CI machine.  Tensors, checks and
// the TORCH_LIBRARY registration live in token_pool.cpp; the interface is token_pool.h.
//
// Forward: one block per output row (b, t).  Each thread owns the channel vectors
// v = threadIdx.x + k·blockDim.x of the row (16-byte vectors: 8 fp16/bf16 or 4 fp32 channels
// when the channel stride is 1 and everything is aligned, else single channels), reads the
// window's input rows for them (several independent loads in flight), accumulates in fp32 and
// writes the output once.  With a norm the fp32 row stays in shared memory, the block reduces
// mean/var (or mean square) over it, and writes the normed row; mean/rstd go to `stats`.
//
// Backward, written as gathers (no atomics, deterministic):
// * no norm: one block per input row (b, n) sums the output-grad rows of the windows / taps
//   that read it (avg: the windows covering it; max: those whose saved argmax is this cell;
//   bilinear: the output rows/columns whose source index or index+1 is this row/column; merge:
//   the single slot it went to);
// * norm: tp_norm_bwd_kernel takes each output row's pre-norm values (saved by the forward in
//   x's dtype; for merge, a bijection, re-read from x) and the forward's mean/rstd, and writes
//   d(pooled) to an fp32 workspace (for merge straight into dx), then the gather above runs on
//   that workspace.  dweight/dbias: each block of the norm kernel (a fixed grid, looping over
//   rows) sums its rows' go·ŷ and go in shared memory, writes one partial row, and
//   tp_partial_reduce_kernel adds the partial rows in a fixed order.
#include "token_pool.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace mmkernels {
namespace token_pool {
namespace {

#ifdef MMK_HOST_EMULATION
// tests/cuda_emu/emu.h runs these kernels on the CPU (one std::thread per CUDA thread) so their
// index math is tested against the float64 reference on machines without a GPU.
using mmk_emu::dyn_smem;
#else
#define MMK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
// The block's dynamic shared memory (one extern array for every kernel and type).
template <typename T>
__device__ __forceinline__ T* dyn_smem() {
  extern __shared__ __align__(16) unsigned char mmk_dyn_smem[];
  return reinterpret_cast<T*>(mmk_dyn_smem);
}
#endif

constexpr int kMaxThreads = 256;
constexpr int kCopy = -1;  // Row::kind of the kept CLS row (copied, not pooled)
constexpr size_t kDefaultSmem = 48 * 1024;

// ---------------------------------------------------------------------------------------------
// element conversions and vector loads/stores
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// V consecutive elements at p.  V > 1 only on the vector path, where p is aligned to
// sizeof(E)·V (16 bytes for x / go / dx; 8 for int16 argmax with fp32; 32 for the fp32
// workspace read with fp16/bf16 inputs): one or two 16-byte (or one 8-byte) accesses.
template <typename E, int V>
__device__ __forceinline__ void ld(const E* p, E (&o)[V]) {
  constexpr int kBytes = static_cast<int>(sizeof(E)) * V;
  if constexpr (V == 1) {
    o[0] = p[0];
  } else if constexpr (kBytes % 16 == 0) {
    uint4 raw[kBytes / 16];
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) raw[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
    memcpy(o, raw, kBytes);
  } else if constexpr (kBytes == 8) {
    uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
    memcpy(o, &raw, kBytes);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = p[i];
  }
}

template <typename E, int V>
__device__ __forceinline__ void st(E* p, const E (&v)[V]) {
  constexpr int kBytes = static_cast<int>(sizeof(E)) * V;
  if constexpr (V == 1) {
    p[0] = v[0];
  } else if constexpr (kBytes % 16 == 0) {
    uint4 raw[kBytes / 16];
    memcpy(raw, v, kBytes);
#pragma unroll
    for (int i = 0; i < kBytes / 16; ++i) reinterpret_cast<uint4*>(p)[i] = raw[i];
  } else if constexpr (kBytes == 8) {
    uint2 raw;
    memcpy(&raw, v, kBytes);
    *reinterpret_cast<uint2*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = v[i];
  }
}

template <typename E, int V>
__device__ __forceinline__ void ld_f(const E* p, float (&o)[V]) {
  E t[V];
  ld<E, V>(p, t);
#pragma unroll
  for (int i = 0; i < V; ++i) o[i] = to_f(t[i]);
}

template <typename E, int V>
__device__ __forceinline__ void st_f(E* p, const float (&v)[V]) {
  E t[V];
#pragma unroll
  for (int i = 0; i < V; ++i) t[i] = from_f<E>(v[i]);
  st<E, V>(p, t);
}

// V fp32 affine parameters p[oc, oc + V) (1 when p is null), with 16-byte loads when `vec` (p
// 16-byte aligned; oc is a multiple of V).
template <int V>
__device__ __forceinline__ void ld_param(const float* p, int64_t oc, bool vec, float (&o)[V]) {
  if (p == nullptr) {
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = 1.f;
    return;
  }
  if constexpr (V % 4 == 0) {
    if (vec) {
#pragma unroll
      for (int j = 0; j < V / 4; ++j) {
        const float4 q = __ldg(reinterpret_cast<const float4*>(p + oc) + j);
        o[4 * j] = q.x;
        o[4 * j + 1] = q.y;
        o[4 * j + 2] = q.z;
        o[4 * j + 3] = q.w;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) o[i] = p[oc + i];
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ---------------------------------------------------------------------------------------------
// block reductions (blockDim.x is a multiple of 32; every thread gets the same total, summed in
// the same order: deterministic)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // an earlier call may still be reading red
  if (lane == 0) red[wid] = v;
  __syncthreads();
  return warp_sum(lane < nw ? red[lane] : 0.f);
}

__device__ __forceinline__ float2 block_sum2(float a, float b, float2* red) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
  if (lane == 0) red[wid] = make_float2(a, b);
  __syncthreads();
  const float2 p = lane < nw ? red[lane] : make_float2(0.f, 0.f);
  return make_float2(warp_sum(p.x), warp_sum(p.y));
}

// ---------------------------------------------------------------------------------------------
// geometry
// ---------------------------------------------------------------------------------------------
// PyTorch's bilinear source index (align_corners=False, no scale_factor): scale = in / out in
// fp32, src = scale·(dst + 0.5) - 0.5 clamped at 0, i0 = (int)src, i1 = i0 + (i0 < in - 1),
// l1 = src - i0, l0 = 1 - l1 (aten/src/ATen/native/cuda/UpSampleBilinear2d.cu).  When
// upsampling, the last outputs have i0 = in - 1 and i1 = i0: both taps are the edge row.
__device__ __forceinline__ void src_index(float scale, int dst, int in_size, int& i0, int& ip,
                                          float& l0, float& l1) {
  float s = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  s = s < 0.f ? 0.f : s;
  i0 = static_cast<int>(s);
  ip = i0 < in_size - 1 ? 1 : 0;
  l1 = s - static_cast<float>(i0);
  l0 = 1.f - l1;
}

// What one output row reads (the same for every thread of the block).
template <typename T>
struct Row {
  const T* cls;   // token 0 of this batch element
  const T* grid;  // grid cell (0, 0) of this batch element
  int kind;       // kCopy or a Mode
  int r0, c0;     // window origin (avg / max / merge)
  int h1, h1p, w1, w1p;
  float h0l, h1l, w0l, w1l;  // bilinear taps
};

template <typename T>
__device__ __forceinline__ Row<T> make_row(const Geom& g, const T* x, int64_t sxb, int64_t sxn,
                                           int64_t b, int t) {
  Row<T> r{};
  r.cls = x + b * sxb;
  r.grid = r.cls + (g.has_cls ? sxn : 0);
  if (g.keep_cls && t == 0) {
    r.kind = kCopy;
    return r;
  }
  const int p = t - g.keep_cls;
  const int oi = p / g.ow, oj = p - oi * g.ow;
  r.kind = g.mode;
  if (g.mode == kBilinear) {
    src_index(static_cast<float>(g.h) / static_cast<float>(g.oh), oi, g.h, r.h1, r.h1p, r.h0l,
              r.h1l);
    src_index(static_cast<float>(g.w) / static_cast<float>(g.ow), oj, g.w, r.w1, r.w1p, r.w0l,
              r.w1l);
  } else {
    r.r0 = oi * g.sh;
    r.c0 = oj * g.sw;
  }
  return r;
}

// Pooled values y[0..V) of output channels [oc, oc + V) of row r (and, for max, the window
// offset di·kw + dj of each winner).
template <typename T, int V, int MODE>
__device__ __forceinline__ void pool_vec(const Geom& g, const Row<T>& r, int64_t sxn, int64_t sxc,
                                         int64_t oc, float (&y)[V], int (&arg)[V]) {
  if (r.kind == kCopy) {
    ld_f<T, V>(r.cls + oc * sxc, y);
    return;
  }
  if constexpr (MODE == kAvg || MODE == kMax) {
    // The window as one flat loop k = di·kw + dj, unrolled by 4: four independent 16-byte loads
    // in flight per thread whatever the window's shape (2×2 is one batch, 4×4 four).
    const int K = g.kh * g.kw;
    const int64_t row_step = static_cast<int64_t>(g.w) * sxn;
    const T* rp = r.grid + (static_cast<int64_t>(r.r0) * g.w + r.c0) * sxn + oc * sxc;
    int dj = 0;
    if constexpr (MODE == kAvg) {
      float acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll 4
      for (int k = 0; k < K; ++k) {
        float v[V];
        ld_f<T, V>(rp + dj * sxn, v);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += v[i];
        if (++dj == g.kw) {
          dj = 0;
          rp += row_step;
        }
      }
      // PyTorch divides the fp32 sum by the window size (no padding: always kh·kw)
      const float div = static_cast<float>(K);
#pragma unroll
      for (int i = 0; i < V; ++i) y[i] = acc[i] / div;
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        y[i] = __int_as_float(0xff800000);  // -inf
        arg[i] = 0;
      }
#pragma unroll 4
      for (int k = 0; k < K; ++k) {
        float v[V];
        ld_f<T, V>(rp + dj * sxn, v);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          // PyTorch's rule: a larger value or any NaN takes over (NaN propagates, the first
          // of equal maxima wins)
          // (selects, not a branch: the four loads of an unrolled batch stay in one block)
          const bool take = (v[i] > y[i]) | (v[i] != v[i]);
          y[i] = take ? v[i] : y[i];
          arg[i] = take ? k : arg[i];
        }
        if (++dj == g.kw) {
          dj = 0;
          rp += row_step;
        }
      }
    }
  } else if constexpr (MODE == kBilinear) {
      const T* p00 = r.grid + (static_cast<int64_t>(r.h1) * g.w + r.w1) * sxn + oc * sxc;
      const int64_t dh = static_cast<int64_t>(r.h1p) * g.w * sxn, dw = r.w1p * sxn;
      float a[V], b[V], c[V], d[V];
      ld_f<T, V>(p00, a);
      ld_f<T, V>(p00 + dw, b);
      ld_f<T, V>(p00 + dh, c);
      ld_f<T, V>(p00 + dh + dw, d);
#pragma unroll
      for (int i = 0; i < V; ++i)  // PyTorch's association order
        y[i] = r.h0l * (r.w0l * a[i] + r.w1l * b[i]) + r.h1l * (r.w0l * c[i] + r.w1l * d[i]);
  } else {  // kMerge: V divides C, so the vector lies inside one slot k = di·kw + dj
      const int64_t k = oc / g.C, c = oc - k * g.C;
      const int di = static_cast<int>(k) / g.kw, dj = static_cast<int>(k) - di * g.kw;
      ld_f<T, V>(r.grid + (static_cast<int64_t>(r.r0 + di) * g.w + r.c0 + dj) * sxn + c * sxc, y);
  }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
template <typename T, int V, int MODE>
__global__ void __launch_bounds__(kMaxThreads)
    tp_fwd_kernel(const Geom g, const T* __restrict__ x, int64_t sxb, int64_t sxn, int64_t sxc,
                  T* __restrict__ out, const float* __restrict__ weight,
                  const float* __restrict__ bias, int16_t* __restrict__ argmax,
                  T* __restrict__ ysave, float* __restrict__ stats) {
  // c_out floats, only with a norm.  Each thread reads back only what it wrote, so the layout is
  // free: element i of vector v at i·nvec + v keeps a warp's accesses on 32 distinct banks.
  float* ybuf = dyn_smem<float>();
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / g.n_out;
  const int t = static_cast<int>(row - b * g.n_out);
  const Row<T> r = make_row<T>(g, x, sxb, sxn, b, t);
  const int64_t nvec = g.c_out / V;
  T* orow = out + row * g.c_out;
  int16_t* arow = nullptr;
  if (MODE == kMax && argmax != nullptr && r.kind == kMax)
    arow = argmax + (b * (g.n_out - g.keep_cls) + (t - g.keep_cls)) * g.C;
  const bool norm = g.norm != kNoNorm;

  T* yrow = ysave != nullptr ? ysave + row * g.c_out : nullptr;

  float s1 = 0.f, s2 = 0.f;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int64_t oc = v * V;
    float y[V];
    int arg[V];
    pool_vec<T, V, MODE>(g, r, sxn, sxc, oc, y, arg);
    if (yrow != nullptr) st_f<T, V>(yrow + oc, y);
    if (arow != nullptr) {
      int16_t a[V];
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = static_cast<int16_t>(arg[i]);
      st<int16_t, V>(arow + oc, a);
    }
    if (!norm) {
      st_f<T, V>(orow + oc, y);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        ybuf[i * nvec + v] = y[i];
        s1 += y[i];
        s2 += y[i] * y[i];
      }
    }
  }
  if (!norm) return;

  // Each thread reads back only the elements it wrote: no barrier needed before these passes.
  const float inv_n = 1.f / static_cast<float>(g.c_out);
  float mean = 0.f, rstd;
  if (g.norm == kLayerNorm) {
    mean = block_sum(s1, red) * inv_n;
    float q = 0.f;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = ybuf[i * nvec + v] - mean;
        q += d * d;
      }
    }
    rstd = rsqrtf(block_sum(q, red) * inv_n + g.eps);  // two-pass variance: no cancellation
  } else {
    rstd = rsqrtf(block_sum(s2, red) * inv_n + g.eps);
  }
  if (threadIdx.x == 0 && stats != nullptr) {
    stats[row] = mean;
    stats[g.B * g.n_out + row] = rstd;
  }
  const bool pvec = aligned16(weight) && aligned16(bias);
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int64_t oc = v * V;
    float o[V], wv[V], bv[V];
    ld_param<V>(weight, oc, pvec, wv);
    if (bias != nullptr) ld_param<V>(bias, oc, pvec, bv);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      o[i] = (ybuf[i * nvec + v] - mean) * rstd * wv[i];
      if (bias != nullptr) o[i] += bv[i];
    }
    st_f<T, V>(orow + oc, o);
  }
}

// ---------------------------------------------------------------------------------------------
// backward: norm
// ---------------------------------------------------------------------------------------------
// Grid: a fixed number of blocks looping over the B·n_out output rows.  Per row: y (the saved
// pre-norm row, or for merge (FROM_X) recomputed from x) into shared memory,
// ŷ = (y - mean)·rstd (rmsnorm: y·rstd) with the forward's mean/rstd, g = go·weight,
//   layernorm: dy = rstd·(g - mean(g) - ŷ·mean(g·ŷ))     rmsnorm: dy = rstd·(g - ŷ·mean(g·ŷ)),
// written to dy_ws (fp32) or, for merge, to its dx slot; dweight += go·ŷ, dbias += go.
template <typename T, int V, bool FROM_X>
__global__ void __launch_bounds__(kMaxThreads)
    tp_norm_bwd_kernel(const Geom g, const T* __restrict__ x, int64_t sxb, int64_t sxn,
                       int64_t sxc, const T* __restrict__ go, int64_t sgb, int64_t sgn,
                       int64_t sgc, const float* __restrict__ weight, const T* __restrict__ ysaved,
                       const float* __restrict__ stats, float* __restrict__ dy_ws,
                       T* __restrict__ dx, float* __restrict__ partial) {
  // y | dweight partial | dbias partial, c_out floats each, thread-private, element i of vector v
  // at i·nvec + v (conflict-free, as in the forward)
  float* sm = dyn_smem<float>();
  float* ys = sm;
  float* dws = sm + g.c_out;
  float* dbs = sm + 2 * g.c_out;
  __shared__ float2 red[32];
  const int64_t nvec = g.c_out / V;
  const int64_t rows = g.B * g.n_out;
  const float inv_n = 1.f / static_cast<float>(g.c_out);
  const bool ln = g.norm == kLayerNorm;

  const bool pvec = aligned16(weight);
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
#pragma unroll
    for (int i = 0; i < V; ++i) dws[i * nvec + v] = dbs[i * nvec + v] = 0.f;
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / g.n_out;
    const int t = static_cast<int>(row - b * g.n_out);
    Row<T> r{};
    if constexpr (FROM_X) r = make_row<T>(g, x, sxb, sxn, b, t);
    const T* grow = go + b * sgb + static_cast<int64_t>(t) * sgn;
    const float mean = stats[row], rstd = stats[rows + row];
    float s1 = 0.f, s2 = 0.f;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t oc = v * V;
      float y[V], gv[V];
      if constexpr (FROM_X) {
        int arg[V];
        pool_vec<T, V, kMerge>(g, r, sxn, sxc, oc, y, arg);
      } else {
        ld_f<T, V>(ysaved + row * g.c_out + oc, y);
      }
      ld_f<T, V>(grow + oc * sgc, gv);
      float wv[V];
      ld_param<V>(weight, oc, pvec, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t si = i * nvec + v;
        ys[si] = y[i];
        const float yh = (ln ? y[i] - mean : y[i]) * rstd;
        const float gw = gv[i] * wv[i];
        s1 += gw;
        s2 += gw * yh;
        dws[si] += gv[i] * yh;
        dbs[si] += gv[i];
      }
    }
    const float2 s = block_sum2(s1, s2, red);
    const float m1 = ln ? s.x * inv_n : 0.f, m2 = s.y * inv_n;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t oc = v * V;
      float gv[V], dy[V], wv[V];
      ld_f<T, V>(grow + oc * sgc, gv);  // second read of this row: an L1/L2 hit
      ld_param<V>(weight, oc, pvec, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float yv = ys[i * nvec + v];
        const float yh = (ln ? yv - mean : yv) * rstd;
        dy[i] = rstd * (gv[i] * wv[i] - m1 - yh * m2);
      }
      if constexpr (FROM_X) {  // merge, a bijection: this slot is the only reader of its dx element
        const int64_t k = oc / g.C, c = oc - k * g.C;
        const int di = static_cast<int>(k) / g.kw, dj = static_cast<int>(k) - di * g.kw;
        const int64_t n = g.has_cls + static_cast<int64_t>(r.r0 + di) * g.w + r.c0 + dj;
        st_f<T, V>(dx + (b * g.n_in + n) * g.C + c, dy);
      } else {
        st<float, V>(dy_ws + row * g.c_out + oc, dy);
      }
    }
  }
  float* pw = partial + static_cast<int64_t>(blockIdx.x) * g.c_out;
  float* pb = partial + static_cast<int64_t>(gridDim.x + blockIdx.x) * g.c_out;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      pw[v * V + i] = dws[i * nvec + v];
      pb[v * V + i] = dbs[i * nvec + v];
    }
  }
  // merge drops the CLS token (keep_cls is never set with merge): its gradient is zero
  if (FROM_X && g.has_cls) {
    for (int64_t b = blockIdx.x; b < g.B; b += gridDim.x) {
      T* d = dx + b * g.n_in * g.C;
      for (int64_t c = threadIdx.x; c < g.C; c += blockDim.x) d[c] = from_f<T>(0.f);
    }
  }
}

// dweight[c] = Σ_i partial[0][i][c], dbias[c] = Σ_i partial[1][i][c], in a fixed order (fp64).
__global__ void tp_partial_reduce_kernel(const float* __restrict__ partial, int n, int64_t c_out,
                                         float* __restrict__ dweight, float* __restrict__ dbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= c_out) return;
  if (dweight != nullptr) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += partial[static_cast<int64_t>(i) * c_out + c];
    dweight[c] = static_cast<float>(s);
  }
  if (dbias != nullptr) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += partial[static_cast<int64_t>(n + i) * c_out + c];
    dbias[c] = static_cast<float>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// backward: gather
// ---------------------------------------------------------------------------------------------
// One block per input row (b, n); gr: the grad of the pooled rows (go, or the fp32 norm
// workspace), (B, n_out, c_out) with strides.
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kMaxThreads)
    tp_gather_kernel(const Geom g, const G* __restrict__ gr, int64_t sgb, int64_t sgn,
                     int64_t sgc, const int16_t* __restrict__ argmax, T* __restrict__ dx) {
  __shared__ int tap_o[2][kMaxBilinearTaps];
  __shared__ float tap_w[2][kMaxBilinearTaps];
  __shared__ int tap_n[2];
  const int64_t row = blockIdx.x;
  const int64_t b = row / g.n_in;
  const int n = static_cast<int>(row - b * g.n_in);
  const int64_t nvec = g.C / V;
  T* drow = dx + row * g.C;
  const G* gb = gr + b * sgb;
  const int t0 = g.keep_cls;

  if (g.has_cls && n == 0) {  // CLS: its own output row when kept, else dropped
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float d[V];
      if (g.keep_cls) {
        ld_f<G, V>(gb + v * V * sgc, d);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = 0.f;
      }
      st_f<T, V>(drow + v * V, d);
    }
    return;
  }
  const int cell = n - g.has_cls;
  const int r = cell / g.w, q = cell - r * g.w;

  if (g.mode == kBilinear) {
    if (threadIdx.x < 2) {  // thread 0: output rows reading input row r; thread 1: columns
      const int axis = threadIdx.x;
      const int in = axis ? g.w : g.h, out = axis ? g.ow : g.oh, pos = axis ? q : r;
      const float scale = static_cast<float>(in) / static_cast<float>(out);
      // outputs whose source index is pos - 1 or pos; the source index grows with the output
      // index, so start just below the first candidate (float slack: -2) and stop past pos
      int o = static_cast<int>(floorf((static_cast<float>(pos) - 0.5f) / scale - 0.5f)) - 2;
      o = o < 0 ? 0 : o;
      int cnt = 0;
      for (; o < out; ++o) {
        int i0, ip;
        float l0, l1;
        src_index(scale, o, in, i0, ip, l0, l1);
        if (i0 > pos) break;
        const bool lo = i0 == pos, hi = i0 + ip == pos;
        if ((lo || hi) && cnt < kMaxBilinearTaps) {
          tap_o[axis][cnt] = o;
          tap_w[axis][cnt] = (lo ? l0 : 0.f) + (hi ? l1 : 0.f);
          ++cnt;
        }
      }
      tap_n[axis] = cnt;
    }
    __syncthreads();
    const int nr = tap_n[0], nc = tap_n[1];
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t c = v * V;
      float acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.f;
      for (int a = 0; a < nr; ++a) {
        const float wr = tap_w[0][a];
        const G* grow = gb + (t0 + static_cast<int64_t>(tap_o[0][a]) * g.ow) * sgn + c * sgc;
        for (int e = 0; e < nc; ++e) {
          const float wt = wr * tap_w[1][e];
          float gv[V];
          ld_f<G, V>(grow + tap_o[1][e] * sgn, gv);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += wt * gv[i];
        }
      }
      st_f<T, V>(drow + c, acc);
    }
    return;
  }

  if (g.mode == kMerge) {
    const int oi = r / g.kh, oj = q / g.kw;
    const int di = r - oi * g.kh, dj = q - oj * g.kw;
    const bool hit = oi < g.oh && oj < g.ow;
    const G* src = gb + (t0 + static_cast<int64_t>(oi) * g.ow + oj) * sgn +
                   static_cast<int64_t>(di * g.kw + dj) * g.C * sgc;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      float d[V];
      if (hit) {
        ld_f<G, V>(src + v * V * sgc, d);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = 0.f;
      }
      st_f<T, V>(drow + v * V, d);
    }
    return;
  }

  // avg / max: the windows oi·sh <= r < oi·sh + kh (floor mode: oi < oh), same for columns
  const int oi_lo = r < g.kh ? 0 : (r - g.kh + g.sh) / g.sh;
  const int oi_hi = min(r / g.sh, g.oh - 1);
  const int oj_lo = q < g.kw ? 0 : (q - g.kw + g.sw) / g.sw;
  const int oj_hi = min(q / g.sw, g.ow - 1);
  const bool is_max = g.mode == kMax;
  const float inv_k = 1.f / static_cast<float>(g.kh * g.kw);
  const int64_t np = static_cast<int64_t>(g.oh) * g.ow;
  for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
    const int64_t c = v * V;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    for (int oi = oi_lo; oi <= oi_hi; ++oi) {
      for (int oj = oj_lo; oj <= oj_hi; ++oj) {
        const int64_t p = static_cast<int64_t>(oi) * g.ow + oj;
        float gv[V];
        ld_f<G, V>(gb + (t0 + p) * sgn + c * sgc, gv);
        if (is_max) {
          int16_t a[V];
          ld<int16_t, V>(argmax + (b * np + p) * g.C + c, a);
          const int local = (r - oi * g.sh) * g.kw + (q - oj * g.sw);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += a[i] == local ? gv[i] : 0.f;
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += gv[i] * inv_k;
        }
      }
    }
    st_f<T, V>(drow + c, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};
template <int V>
using IntC = std::integral_constant<int, V>;

// f(Tag<T>, IntC<V>) for the element type of dt and the vector width (16 bytes or 1).
template <typename F>
cudaError_t dispatch(DType dt, bool vec, F&& f) {
  switch (dt) {
    case kF32:
      return vec ? f(Tag<float>{}, IntC<4>{}) : f(Tag<float>{}, IntC<1>{});
    case kF16:
      return vec ? f(Tag<__half>{}, IntC<8>{}) : f(Tag<__half>{}, IntC<1>{});
    case kBF16:
      return vec ? f(Tag<__nv_bfloat16>{}, IntC<8>{}) : f(Tag<__nv_bfloat16>{}, IntC<1>{});
  }
  return cudaErrorInvalidValue;
}

// f(std::bool_constant<B>) for a run-time bool.
template <typename F>
cudaError_t dispatch_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

// f(IntC<MODE>) for a run-time mode.
template <typename F>
cudaError_t dispatch_mode(int mode, F&& f) {
  switch (mode) {
    case kAvg:
      return f(IntC<kAvg>{});
    case kMax:
      return f(IntC<kMax>{});
    case kBilinear:
      return f(IntC<kBilinear>{});
    case kMerge:
      return f(IntC<kMerge>{});
  }
  return cudaErrorInvalidValue;
}

// A multiple of 32 (the block reductions rely on whole warps), at most kMaxThreads, and no
// more than one thread per vector of the row when the row is short.
int threads_for(int64_t nvec) {
  const int64_t t = std::min<int64_t>(kMaxThreads, (nvec + 31) / 32 * 32);
  return static_cast<int>(std::max<int64_t>(32, t));
}

template <typename K>
cudaError_t allow_smem(K kernel, size_t smem) {
  if (smem <= kDefaultSmem) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

}  // namespace

size_t fwd_smem_bytes(const Geom& g) {
  return g.norm == kNoNorm ? 0 : static_cast<size_t>(g.c_out) * sizeof(float);
}

size_t norm_bwd_smem_bytes(const Geom& g) {
  return g.norm == kNoNorm ? 0 : 3 * static_cast<size_t>(g.c_out) * sizeof(float);
}

int norm_bwd_blocks(const Geom& g, DType dt, bool vec, int max_per_sm) {
  const int64_t rows = g.B * g.n_out;
  if (rows <= 0) return 1;
  int blocks = 0;
  dispatch(dt, vec, [&](auto tag, auto vw) -> cudaError_t {
    return dispatch_bool(g.mode == kMerge, [&](auto from_x) -> cudaError_t {
      using T = typename decltype(tag)::type;
      constexpr int V = decltype(vw)::value;
      const auto kernel = tp_norm_bwd_kernel<T, V, decltype(from_x)::value>;
      const size_t smem = norm_bwd_smem_bytes(g);
      int dev = 0, sms = 0, per_sm = 0;
      cudaError_t e = allow_smem(kernel, smem);
      if (e == cudaSuccess) e = cudaGetDevice(&dev);
      if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
      if (e == cudaSuccess)
        e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, reinterpret_cast<const void*>(kernel), threads_for(g.c_out / V), smem);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();  // the launch will report it
        per_sm = sms = 1;
      }
      blocks = std::max(1, std::min(per_sm, std::max(1, max_per_sm))) * std::max(1, sms);
      return e;
    });
  });
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, blocks)));
}

cudaError_t launch_fwd(const Geom& g, DType dt, bool vec, View3 x, void* out, const float* weight,
                       const float* bias, int16_t* argmax, void* y, float* stats,
                       cudaStream_t stream) {
  const int64_t rows = g.B * g.n_out;
  if (rows == 0 || g.c_out == 0) return cudaSuccess;
  return dispatch(dt, vec, [&](auto tag, auto vw) -> cudaError_t {
    return dispatch_mode(g.mode, [&](auto md) -> cudaError_t {
      using T = typename decltype(tag)::type;
      constexpr int V = decltype(vw)::value;
      const auto kernel = tp_fwd_kernel<T, V, decltype(md)::value>;
      const size_t smem = fwd_smem_bytes(g);
      cudaError_t e = allow_smem(kernel, smem);
      if (e != cudaSuccess) return e;
      MMK_LAUNCH(kernel, static_cast<unsigned>(rows), threads_for(g.c_out / V), smem, stream, g,
                 static_cast<const T*>(x.ptr), x.s0, x.s1, x.s2, static_cast<T*>(out), weight,
                 bias, argmax, static_cast<T*>(y), stats);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_bwd(const Geom& g, DType dt, bool vec_norm, bool vec_gather, View3 go, View3 x,
                       const float* weight, const int16_t* argmax, const void* y,
                       const float* stats, void* dx, float* dy_ws, float* partial_ws,
                       int n_partial, float* dweight, float* dbias, cudaStream_t stream) {
  if (g.B == 0 || g.n_in == 0 || g.C == 0) return cudaSuccess;
  const bool norm = g.norm != kNoNorm;
  if (norm) {
    cudaError_t e = dispatch(dt, vec_norm, [&](auto tag, auto vw) -> cudaError_t {
      return dispatch_bool(g.mode == kMerge, [&](auto from_x) -> cudaError_t {
        using T = typename decltype(tag)::type;
        constexpr int V = decltype(vw)::value;
        const auto kernel = tp_norm_bwd_kernel<T, V, decltype(from_x)::value>;
        const size_t smem = norm_bwd_smem_bytes(g);
        cudaError_t e2 = allow_smem(kernel, smem);
        if (e2 != cudaSuccess) return e2;
        MMK_LAUNCH(kernel, static_cast<unsigned>(n_partial), threads_for(g.c_out / V), smem,
                   stream, g, static_cast<const T*>(x.ptr), x.s0, x.s1, x.s2,
                   static_cast<const T*>(go.ptr), go.s0, go.s1, go.s2, weight,
                   static_cast<const T*>(y), stats, dy_ws, static_cast<T*>(dx), partial_ws);
        return cudaGetLastError();
      });
    });
    if (e != cudaSuccess) return e;
    if (dweight != nullptr || dbias != nullptr) {
      const int threads = 256;
      const unsigned blocks = static_cast<unsigned>((g.c_out + threads - 1) / threads);
      MMK_LAUNCH(tp_partial_reduce_kernel, blocks, threads, 0, stream, partial_ws, n_partial,
                 g.c_out, dweight, dbias);
      e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    if (g.mode == kMerge) return cudaSuccess;  // dx written by the norm kernel
  }
  const int64_t rows = g.B * g.n_in;
  // the fp32 workspace is contiguous and 16-byte aligned: only C decides its vector path
  const bool vec = norm ? g.C % vec_elems(dt) == 0 : vec_gather;
  return dispatch(dt, vec, [&](auto tag, auto vw) -> cudaError_t {
    using T = typename decltype(tag)::type;
    constexpr int V = decltype(vw)::value;
    const unsigned grid = static_cast<unsigned>(rows);
    const int threads = threads_for(g.C / V);
    if (norm) {
      const auto kernel = tp_gather_kernel<T, float, V>;
      MMK_LAUNCH(kernel, grid, threads, 0, stream, g, static_cast<const float*>(dy_ws),
                 g.n_out * g.c_out, g.c_out, int64_t{1}, argmax, static_cast<T*>(dx));
    } else {
      const auto kernel = tp_gather_kernel<T, T, V>;
      MMK_LAUNCH(kernel, grid, threads, 0, stream, g, static_cast<const T*>(go.ptr), go.s0,
                 go.s1, go.s2, argmax, static_cast<T*>(dx));
    }
    return cudaGetLastError();
  });
}

}  // namespace token_pool
}  // namespace mmkernels
