// token_pool.cpp — torch side of the CUDA token-pool kernels: argument checks, workspaces, the
// current stream, and the registration of
//
//   mmkernels_cuda::token_pool_fwd(x, geom, eps, weight?, bias?, out!, argmax!, y!, stats!)
//   mmkernels_cuda::token_pool_bwd(grad_out, x, geom, weight?, argmax, y, stats,
//                                  dx!, dweight!, dbias!)
//
// geom = [h, w, mode, kh, kw, sh, sw, oh, ow, has_cls, keep_cls, norm] with the codes of
// token_pool.h (mode: avg 0, max 1, bilinear 2, merge 3; norm: none 0, layernorm 1, rmsnorm 2).
// The caller (mmkernels/kernels/token_pool_cuda.py) allocates every output, so poisoning and the
// saved-tensor layout stay in Python; an output that is not wanted is passed as an empty
// tensor.  Both ops write in place and return nothing: they are launch primitives, not the
// public op (that is mmkernels.token_pool, whose torch.library op wraps these calls).
#include "token_pool.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

namespace mmkernels {
namespace token_pool {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kF32;
    case at::kHalf:
      return kF16;
    case at::kBFloat16:
      return kBF16;
    default:
      TORCH_CHECK(false, "token_pool (cuda): x must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return kF32;
}

View3 view_of(const at::Tensor& t) {
  View3 v;
  v.ptr = t.data_ptr();
  v.s0 = t.stride(0);
  v.s1 = t.stride(1);
  v.s2 = t.stride(2);
  return v;
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

Geom checked_geom(const at::Tensor& x, at::IntArrayRef geom, double eps) {
  TORCH_CHECK(geom.size() == kGeomLen, "token_pool (cuda): geom must have ", kGeomLen,
              " entries, got ", geom.size());
  TORCH_CHECK(x.is_cuda(), "token_pool (cuda): x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, "token_pool (cuda): x must be (B, N, C), got ", x.sizes());
  const Geom g = make_geom(geom.data(), x.size(0), x.size(1), x.size(2), eps);

  TORCH_CHECK(g.mode >= kAvg && g.mode <= kMerge, "token_pool (cuda): unknown mode code ", g.mode);
  TORCH_CHECK(g.norm >= kNoNorm && g.norm <= kRMSNorm, "token_pool (cuda): unknown norm code ",
              g.norm);
  TORCH_CHECK(g.h > 0 && g.w > 0 && g.oh > 0 && g.ow > 0 && g.kh > 0 && g.kw > 0 && g.sh > 0 &&
                  g.sw > 0,
              "token_pool (cuda): sizes must be positive, got geom ", geom);
  TORCH_CHECK(g.n_in == static_cast<int64_t>(g.h) * g.w + g.has_cls,
              "token_pool (cuda): x has ", g.n_in, " tokens, expected h*w + has_cls = ",
              static_cast<int64_t>(g.h) * g.w + g.has_cls);
  TORCH_CHECK(!g.keep_cls || g.has_cls, "token_pool (cuda): keep_cls needs has_cls");
  if (g.mode == kAvg || g.mode == kMax) {
    TORCH_CHECK(g.kh <= g.h && g.kw <= g.w && g.oh == (g.h - g.kh) / g.sh + 1 &&
                    g.ow == (g.w - g.kw) / g.sw + 1,
                "token_pool (cuda): output grid (", g.oh, ", ", g.ow,
                ") does not match the window geometry ", geom);
  } else if (g.mode == kMerge) {
    TORCH_CHECK(g.sh == g.kh && g.sw == g.kw && g.h % g.kh == 0 && g.w % g.kw == 0 &&
                    g.oh == g.h / g.kh && g.ow == g.w / g.kw && !g.keep_cls,
                "token_pool (cuda): merge needs stride == kernel dividing the grid and no "
                "keep_cls, got geom ",
                geom);
  } else {
    TORCH_CHECK(g.oh <= kMaxBilinearRatio * g.h && g.ow <= kMaxBilinearRatio * g.w,
                "token_pool (cuda): bilinear upsampling by more than ", kMaxBilinearRatio,
                "x is not supported");
  }
  TORCH_CHECK(g.mode != kMax || g.kh * g.kw <= 32767,
              "token_pool (cuda): max window too large for int16 indices");
  TORCH_CHECK(g.norm == kNoNorm || g.c_out <= kMaxNormChannels, "token_pool (cuda): a fused norm ",
              "supports at most ", kMaxNormChannels, " channels, got ", g.c_out);
  TORCH_CHECK(g.B * g.n_out < (int64_t{1} << 31) && g.B * g.n_in < (int64_t{1} << 31),
              "token_pool (cuda): too many rows for one grid");
  return g;
}

void check_out(const at::Tensor& t, const char* name, at::ScalarType dtype,
               std::initializer_list<int64_t> shape, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == dtype, "token_pool (cuda): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "token_pool (cuda): ", name, " must be on ", x.device());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "token_pool (cuda): ", name, " must be ",
              at::IntArrayRef(shape), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "token_pool (cuda): ", name, " must be contiguous");
}

// fp32 contiguous copy of an optional affine parameter (c_out,), or an undefined tensor.
at::Tensor affine(const std::optional<at::Tensor>& p, const char* name, const Geom& g,
                  const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(g.norm != kNoNorm, "token_pool (cuda): ", name, " given without a norm");
  TORCH_CHECK(p->dim() == 1 && p->size(0) == g.c_out, "token_pool (cuda): ", name, " must be (",
              g.c_out, ",), got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), "token_pool (cuda): ", name, " must be on ", x.device());
  return p->to(at::kFloat).contiguous();
}

const float* fptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.data_ptr<float>() : nullptr;
}

// torch's current stream on x's device, through the device-generic guard interface: the
// c10/cuda headers need a CUDA build of torch even to be parsed, so this file stays checkable
// (g++ -fsyntax-only) against the CPU wheel.
cudaStream_t current_stream(const at::Tensor& x) {
  const c10::Stream s =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device());
  return static_cast<cudaStream_t>(s.native_handle());
}

// MMKERNELS_TOKEN_POOL_BWD_BLOCKS_PER_SM: the norm backward's grid (a tuning knob for the GPU
// session; see kNormBwdBlocksPerSM).
int norm_bwd_blocks_per_sm() {
  const char* v = std::getenv("MMKERNELS_TOKEN_POOL_BWD_BLOCKS_PER_SM");
  const int n = v != nullptr ? std::atoi(v) : 0;
  return n > 0 ? n : kNormBwdBlocksPerSM;
}

void check_cuda(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "token_pool (cuda): ", what, " failed: ", cudaGetErrorString(e));
}

void token_pool_fwd(const at::Tensor& x, at::IntArrayRef geom, double eps,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    at::Tensor& out, at::Tensor& argmax, at::Tensor& y, at::Tensor& stats) {
  const Geom g = checked_geom(x, geom, eps);
  const DType dt = dtype_of(x);
  c10::DeviceGuard guard(x.device());
  check_out(out, "out", x.scalar_type(), {g.B, g.n_out, g.c_out}, x);
  const bool want_arg = g.mode == kMax;
  const bool want_stats = g.norm != kNoNorm;
  if (want_arg) check_out(argmax, "argmax", at::kShort, {g.B, g.n_out - g.keep_cls, g.C}, x);
  const bool want_y = saves_y(g);
  if (want_y) check_out(y, "y", x.scalar_type(), {g.B, g.n_out, g.c_out}, x);
  if (want_stats) check_out(stats, "stats", at::kFloat, {2, g.B, g.n_out}, x);
  const at::Tensor w = affine(weight, "weight", g, x);
  const at::Tensor b = affine(bias, "bias", g, x);

  const View3 xv = view_of(x);
  const bool vec = vector_ok(xv, g.C, dt) && aligned16(out) && (!want_arg || aligned16(argmax)) &&
                   (!want_y || aligned16(y));
  check_cuda(launch_fwd(g, dt, vec, xv, out.data_ptr(), fptr(w), fptr(b),
                        want_arg ? argmax.data_ptr<int16_t>() : nullptr,
                        want_y ? y.data_ptr() : nullptr,
                        want_stats ? stats.data_ptr<float>() : nullptr,
                        current_stream(x)),
             "forward launch");
}

void token_pool_bwd(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef geom,
                    const std::optional<at::Tensor>& weight, const at::Tensor& argmax,
                    const at::Tensor& y, const at::Tensor& stats, at::Tensor& dx,
                    at::Tensor& dweight, at::Tensor& dbias) {
  const Geom g = checked_geom(x, geom, 1e-6);
  const DType dt = dtype_of(x);
  c10::DeviceGuard guard(x.device());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device() &&
                  grad_out.sizes() == at::IntArrayRef({g.B, g.n_out, g.c_out}),
              "token_pool (cuda): grad_out must be ", x.scalar_type(), " (", g.B, ", ", g.n_out,
              ", ", g.c_out, ") on ", x.device(), ", got ", grad_out.scalar_type(), " ",
              grad_out.sizes(), " on ", grad_out.device());
  check_out(dx, "dx", x.scalar_type(), {g.B, g.n_in, g.C}, x);
  const bool norm = g.norm != kNoNorm;
  if (g.mode == kMax) {
    TORCH_CHECK(argmax.scalar_type() == at::kShort && argmax.is_contiguous() &&
                    argmax.device() == x.device() &&
                    argmax.sizes() == at::IntArrayRef({g.B, g.n_out - g.keep_cls, g.C}),
                "token_pool (cuda): argmax must be the int16 (B, oh*ow, C) tensor the forward "
                "saved, got ",
                argmax.scalar_type(), " ", argmax.sizes());
  }
  if (saves_y(g)) {
    TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.is_contiguous() && y.device() == x.device() &&
                    y.sizes() == at::IntArrayRef({g.B, g.n_out, g.c_out}),
                "token_pool (cuda): y must be the (B, n_out, c_out) pre-norm rows the forward "
                "saved, got ",
                y.scalar_type(), " ", y.sizes());
  }
  if (norm) {
    TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() &&
                    stats.device() == x.device() &&
                    stats.sizes() == at::IntArrayRef({2, g.B, g.n_out}),
                "token_pool (cuda): stats must be the float32 (2, B, n_out) tensor the forward "
                "saved, got ",
                stats.scalar_type(), " ", stats.sizes());
  }
  const bool want_dw = norm && dweight.numel() > 0;
  const bool want_db = norm && dbias.numel() > 0;
  if (want_dw) check_out(dweight, "dweight", at::kFloat, {g.c_out}, x);
  if (want_db) check_out(dbias, "dbias", at::kFloat, {g.c_out}, x);
  const at::Tensor w = affine(weight, "weight", g, x);

  const View3 gv = view_of(grad_out), xv = view_of(x);
  const bool aux_ok = aligned16(dx) && (g.mode != kMax || aligned16(argmax));
  const bool vec_gather = vector_ok(gv, g.c_out, dt) && g.C % vec_elems(dt) == 0 && aux_ok;
  const bool vec_norm = vec_gather && (saves_y(g) ? aligned16(y) : vector_ok(xv, g.C, dt));

  at::Tensor dy_ws, partial_ws;
  int n_partial = 1;
  if (norm) {
    if (g.mode != kMerge) dy_ws = at::empty({g.B, g.n_out, g.c_out}, x.options().dtype(at::kFloat));
    n_partial = norm_bwd_blocks(g, dt, vec_norm, norm_bwd_blocks_per_sm());
    partial_ws = at::empty({2, n_partial, g.c_out}, x.options().dtype(at::kFloat));
  }
  check_cuda(
      launch_bwd(g, dt, vec_norm, vec_gather, gv, xv, fptr(w),
                 g.mode == kMax ? argmax.data_ptr<int16_t>() : nullptr,
                 saves_y(g) ? y.data_ptr() : nullptr, norm ? stats.data_ptr<float>() : nullptr,
                 dx.data_ptr(),
                 dy_ws.defined() ? dy_ws.data_ptr<float>() : nullptr,
                 partial_ws.defined() ? partial_ws.data_ptr<float>() : nullptr, n_partial,
                 want_dw ? dweight.data_ptr<float>() : nullptr,
                 want_db ? dbias.data_ptr<float>() : nullptr,
                 current_stream(x)),
      "backward launch");
}

}  // namespace
}  // namespace token_pool
}  // namespace mmkernels

// FRAGMENT: the namespace mmkernels_cuda is claimed by TORCH_LIBRARY in bindings.cpp; each
// kernel family adds its own ops.
TORCH_LIBRARY_FRAGMENT(mmkernels_cuda, m) {
  m.def(
      "token_pool_fwd(Tensor x, int[] geom, float eps, Tensor? weight, Tensor? bias, "
      "Tensor(a!) out, Tensor(b!) argmax, Tensor(c!) y, Tensor(d!) stats) -> ()");
  m.def(
      "token_pool_bwd(Tensor grad_out, Tensor x, int[] geom, Tensor? weight, Tensor argmax, "
      "Tensor y, Tensor stats, Tensor(a!) dx, Tensor(b!) dweight, Tensor(c!) dbias) -> ()");
}

TORCH_LIBRARY_IMPL(mmkernels_cuda, CUDA, m) {
  m.impl("token_pool_fwd", &mmkernels::token_pool::token_pool_fwd);
  m.impl("token_pool_bwd", &mmkernels::token_pool::token_pool_bwd);
}
