// C entry points of csrc/token_pool.cu for the host emulation (tests/test_token_pool_cuda.py
// loads them with ctypes): the launchers of token_pool.h with plain arguments, no torch.
// One translation unit: the emulation header, then the .cu itself (found through -Icsrc).
//
//   g++ -std=c++20 -O2 -shared -fPIC -pthread -DMMK_HOST_EMULATION -Icsrc -I<cuda>/include \
//       tests/cuda_emu/token_pool_entry.cpp -o libtoken_pool_emu.so
#include "emu.h"
// (emu.h first: it replaces the CUDA keywords the .cu uses)
#include "token_pool.cu"

using namespace mmkernels::token_pool;

extern "C" {

int mmk_tp_fwd(const int64_t* geom, int64_t B, int64_t n_in, int64_t C, double eps, int dt, int vec,
               const void* x, int64_t s0, int64_t s1, int64_t s2, void* out, const float* weight,
               const float* bias, int16_t* argmax, void* y, float* stats) {
  const Geom g = make_geom(geom, B, n_in, C, eps);
  const View3 xv{x, s0, s1, s2};
  return static_cast<int>(launch_fwd(g, static_cast<DType>(dt), vec != 0, xv, out, weight, bias,
                                     argmax, y, stats, nullptr));
}

int mmk_tp_norm_bwd_blocks(const int64_t* geom, int64_t B, int64_t n_in, int64_t C, int dt,
                           int vec) {
  const Geom g = make_geom(geom, B, n_in, C, 1e-6);
  return norm_bwd_blocks(g, static_cast<DType>(dt), vec != 0);
}

int mmk_tp_bwd(const int64_t* geom, int64_t B, int64_t n_in, int64_t C, int dt, int vec_norm,
               int vec_gather, const void* go, int64_t gs0, int64_t gs1, int64_t gs2, const void* x,
               int64_t xs0, int64_t xs1, int64_t xs2, const float* weight, const int16_t* argmax,
               const void* y, const float* stats, void* dx, float* dy_ws, float* partial_ws,
               int n_partial, float* dweight, float* dbias) {
  const Geom g = make_geom(geom, B, n_in, C, 1e-6);
  const View3 gv{go, gs0, gs1, gs2}, xv{x, xs0, xs1, xs2};
  return static_cast<int>(launch_bwd(g, static_cast<DType>(dt), vec_norm != 0, vec_gather != 0, gv,
                                     xv, weight, argmax, y, stats, dx, dy_ws, partial_ws,
                                     n_partial, dweight, dbias, nullptr));
}

}  // extern "C"
