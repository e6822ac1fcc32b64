// token_pool.h — the plain-C++ interface between csrc/token_pool.cu (kernels + launchers, no
// torch headers: it compiles in seconds) and csrc/token_pool.cpp (torch tensors, checks, the
// TORCH_LIBRARY registration).  Everything here is POD and raw pointers.
//
// Semantics (DESIGN.md, mmkernels/kernels/token_pool.py::TokenPoolSpec):
//   x (B, n_in, C), n_in = h·w + has_cls, grid token (i, j) at row has_cls + i·w + j, any strides.
//   out (B, n_out, c_out) contiguous, n_out = keep_cls + oh·ow; row 0 = token 0 when keep_cls.
//   avg / max:  F.avg_pool2d / F.max_pool2d, window (kh, kw), stride (sh, sw), no padding, floor.
//   bilinear:   F.interpolate(size=(oh, ow), mode="bilinear", align_corners=False).
//   merge:      space-to-depth by (kh, kw) = (sh, sw): out channel (di·kw + dj)·C + c.
//   norm:       layernorm ((y-mean)·rstd·w + b) or rmsnorm (y·rstd·w + b) over c_out, fp32.
// Saved for the backward (mmkernels/kernels/token_pool_cuda.py::saved_like):
//   argmax (B, oh·ow, C) int16, the row-major offset di·kw + dj of the winner in its window;
//   y      (B, n_out, c_out) in x's dtype: the pre-norm rows, with a norm, except for merge
//          (a permutation of x: its backward re-reads x, which costs the same);
//   stats  (2, B, n_out) fp32, with a norm: mean (0 for rmsnorm) and rstd of every output row.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace mmkernels {
namespace token_pool {

enum Mode : int { kAvg = 0, kMax = 1, kBilinear = 2, kMerge = 3 };
enum Norm : int { kNoNorm = 0, kLayerNorm = 1, kRMSNorm = 2 };
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Widest output row a fused norm takes: the forward keeps the row in shared memory as fp32
// (4·c_out bytes), the norm backward keeps the row plus dweight/dbias partial sums (12·c_out
// bytes = 144 KiB at this width, under the 163 KiB an A100 block may opt into).
constexpr int64_t kMaxNormChannels = 12288;
// Bilinear backward gathers at most this many output rows (columns) per input row (column),
// which bounds the upsampling ratio it supports to kMaxBilinearRatio.
constexpr int kMaxBilinearTaps = 32;
constexpr int kMaxBilinearRatio = 8;

struct Geom {
  int64_t B = 0, C = 0, c_out = 0, n_in = 0, n_out = 0;
  int h = 0, w = 0, mode = kAvg, kh = 1, kw = 1, sh = 1, sw = 1, oh = 0, ow = 0;
  int has_cls = 0, keep_cls = 0, norm = kNoNorm;
  float eps = 1e-6f;
};

// Number of entries of the geometry list the ops take.
constexpr int kGeomLen = 12;

// Geom from the ops' list [h, w, mode, kh, kw, sh, sw, oh, ow, has_cls, keep_cls, norm] and x's
// sizes (no validation: token_pool.cpp checks it).
inline Geom make_geom(const int64_t* v, int64_t B, int64_t n_in, int64_t C, double eps) {
  Geom g;
  g.h = static_cast<int>(v[0]);
  g.w = static_cast<int>(v[1]);
  g.mode = static_cast<int>(v[2]);
  g.kh = static_cast<int>(v[3]);
  g.kw = static_cast<int>(v[4]);
  g.sh = static_cast<int>(v[5]);
  g.sw = static_cast<int>(v[6]);
  g.oh = static_cast<int>(v[7]);
  g.ow = static_cast<int>(v[8]);
  g.has_cls = v[9] ? 1 : 0;
  g.keep_cls = v[10] ? 1 : 0;
  g.norm = static_cast<int>(v[11]);
  g.eps = static_cast<float>(eps);
  g.B = B;
  g.n_in = n_in;
  g.C = C;
  g.c_out = g.mode == kMerge ? static_cast<int64_t>(g.kh) * g.kw * C : C;
  g.n_out = static_cast<int64_t>(g.oh) * g.ow + g.keep_cls;
  return g;
}

// Whether the forward saves the pre-norm rows y for the backward.
inline bool saves_y(const Geom& g) { return g.norm != kNoNorm && g.mode != kMerge; }

// A (B, rows, channels) tensor: data pointer and element strides.
struct View3 {
  const void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

// Elements in one 16-byte vector of `dt` (8 for fp16/bf16, 4 for fp32).
inline int vec_elems(DType dt) { return dt == kF32 ? 4 : 8; }

// True when every row of `v` (channels [0, channels)) can be read with 16-byte vector loads:
// unit channel stride, 16-byte aligned base, and row/batch strides and `channels` multiples of
// the vector width.
inline bool vector_ok(const View3& v, int64_t channels, DType dt) {
  const int64_t e = vec_elems(dt);
  return v.s2 == 1 && channels % e == 0 && v.s1 % e == 0 && v.s0 % e == 0 &&
         reinterpret_cast<uintptr_t>(v.ptr) % 16 == 0;
}

// Dynamic shared memory of the forward / the norm backward (0 without norm).
size_t fwd_smem_bytes(const Geom& g);
size_t norm_bwd_smem_bytes(const Geom& g);

// Rows of the (2, n, c_out) fp32 dweight/dbias partial-sum workspace the norm backward needs:
// one per block of its grid, min(resident blocks per SM, max_per_sm) · SMs, at most one per
// output row.  Every partial row costs 8·c_out bytes written and read again, so the grid is kept
// small (default 2 per SM: InternVL's merge + LayerNorm(4096) then spends 17 MB on partials
// against 100 MB of x, grad_out and dx).  Deterministic for a given device, shape and cap.
constexpr int kNormBwdBlocksPerSM = 2;
int norm_bwd_blocks(const Geom& g, DType dt, bool vec, int max_per_sm = kNormBwdBlocksPerSM);

// Forward.  `vec`: 16-byte path (vector_ok(x) and the outputs 16-byte aligned); else scalar.
// weight/bias: fp32 (c_out,) or null.  out: contiguous (B, n_out, c_out).  Saved outputs
// (contiguous, null when not saved): argmax (B, oh·ow, C) int16 when mode == max; y
// (B, n_out, c_out) in x's dtype when saves_y(g); stats (2, B, n_out) fp32 when norm.
cudaError_t launch_fwd(const Geom& g, DType dt, bool vec, View3 x, void* out, const float* weight,
                       const float* bias, int16_t* argmax, void* y, float* stats,
                       cudaStream_t stream);

// Backward.  dx: contiguous (B, n_in, C), every element written.  go: grad of out (any strides).
// argmax / y / stats: what the forward saved (null where it saved nothing).  vec_norm: 16-byte
// path for the norm kernel (go vector_ok, and x too for merge); vec_gather: for the gather
// kernel without norm (go vector_ok).  With norm: dy_ws is a contiguous (B, n_out, c_out) fp32
// workspace (unused, may be null, for merge), partial_ws a (2, n_partial, c_out) fp32 workspace
// with n_partial = norm_bwd_blocks(...); dweight/dbias fp32 (c_out,) or null (not wanted).
cudaError_t launch_bwd(const Geom& g, DType dt, bool vec_norm, bool vec_gather, View3 go, View3 x,
                       const float* weight, const int16_t* argmax, const void* y,
                       const float* stats, void* dx, float* dy_ws, float* partial_ws,
                       int n_partial, float* dweight, float* dbias, cudaStream_t stream);

}  // namespace token_pool
}  // namespace mmkernels
