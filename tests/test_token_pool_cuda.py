"""The CUDA C++ token-pool backend (csrc/token_pool.cu, mmkernels/kernels/token_pool_cuda.py).

Three tiers:

* CPU, always: ``available()`` / ``check()`` reasons, the op codes and the saved layout.
* CPU, host emulation (needs g++ and the CUDA headers; nvcc's are enough): the .cu compiled as
  C++ with ``tests/cuda_emu/emu.h`` (every CUDA thread a std::thread, blocks in sequence) and run
  through ``token_pool_cuda.forward`` / ``backward`` with the launch primitives routed to it.
  This checks the kernels' index math and numerics — every mode, odd grids, stride != kernel,
  CLS, norms, strided inputs, the 16-byte and the scalar paths — against the float64 reference
  where no GPU exists; it says nothing about speed, and nothing about the torch glue in
  csrc/token_pool.cpp (compile-checked only).
* ``@pytest.mark.gpu``: the real extension through ``mk.token_pool(..., backend="cuda")`` with
  autograd.  Without the extension the GPU tests skip with its reason, unless
  ``MMKERNELS_REQUIRE_CUDA_EXT=1`` (scripts/gpu_check.sh sets it) makes that a failure.

Every comparison: outputs poisoned with NaN first, then forward and all gradients (x, norm
weight, norm bias) against the float64 reference by the 2x-PyTorch rule (tests/helpers.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, HAS_CUDA
from helpers import assert_close_rule, poisoned
from token_pool_helpers import norm_params, reference, tokens

import mmkernels as mk
from mmkernels.kernels import token_pool_cuda as tpc
from mmkernels.ops.token_pool import make_spec

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]  # emulation builds, subprocesses

REPO = Path(__file__).resolve().parent.parent
SPEC_KEYS = ("grid", "mode", "kernel_size", "stride", "output_size", "has_cls", "keep_cls", "norm", "eps")


# --------------------------------------------------------------------------------------
# inputs, reference, comparison
# --------------------------------------------------------------------------------------
# the CUDA-emulation tests build their inputs on the CPU; GPU cases pass device= explicitly
_tokens = functools.partial(tokens, device="cpu")
_norm_params = functools.partial(norm_params, device="cpu")


def _compare(out, grads, x, w, b, do, factor, kw):
    out64, grads64 = reference(x, w, b, do, torch.float64, kw)
    outlp, gradslp = reference(x, w, b, do, x.dtype, kw)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_close_rule("out", out, out64, outlp, factor)
    assert len(grads) == len(grads64)
    leaves = [t for t in (x, w, b) if t is not None]
    for name, g, leaf, g64, glp in zip(("dx", "dweight", "dbias"), grads, leaves, grads64, gradslp):
        assert g.dtype == leaf.dtype, f"{name}: dtype {g.dtype}, expected {leaf.dtype}"
        assert_close_rule(name, g, g64, glp, factor)


def _run_module(x, w, b, kw, grad_layout="contiguous"):
    """token_pool_cuda.forward / backward called directly (the op's autograd, unrolled)."""
    spec = make_spec(x, **{k: v for k, v in kw.items() if k in SPEC_KEYS})
    if x.device.type == "cuda":
        assert tpc.check(x, spec) == []
    wd = w.detach() if w is not None else None
    bd = b.detach() if b is not None else None
    with poisoned():
        out, saved = tpc.forward(x.detach(), spec, wd, bd)
        assert [(t.shape, t.dtype) for t in saved] == [(t.shape, t.dtype) for t in tpc.saved_like(x, spec)]
        do = torch.randn_like(out)
        if grad_layout == "permuted":  # a non-contiguous grad_out
            do = torch.randn(out.shape[2], out.shape[1], out.shape[0], dtype=out.dtype,
                             device=out.device).permute(2, 1, 0)
        elif grad_layout == "expanded":  # stride 0 everywhere, as from out.sum().backward()
            do = torch.ones((), dtype=out.dtype, device=out.device).expand(out.shape)
        dx, dw, db = tpc.backward(do, x.detach(), spec, wd, bd, saved)
    assert dx.shape == x.shape and dx.is_contiguous()
    assert (dw is None) == (w is None) and (db is None) == (b is None)
    return out, do, [g for g in (dx, dw, db) if g is not None]


def _run_op(x, w, b, kw, grad_layout="contiguous"):
    """mk.token_pool forced onto the CUDA backend, gradients through autograd."""
    with poisoned(), mk.use_backend("cuda"):
        out = mk.token_pool(x, norm_weight=w, norm_bias=b, **kw)
        do = torch.randn_like(out)
        if grad_layout == "permuted":
            do = torch.randn(out.shape[2], out.shape[1], out.shape[0], dtype=out.dtype,
                             device=out.device).permute(2, 1, 0)
        elif grad_layout == "expanded":
            do = torch.ones((), dtype=out.dtype, device=out.device).expand(out.shape)
        grads = torch.autograd.grad(out, [t for t in (x, w, b) if t is not None], do)
    return out, do, list(grads)


# --------------------------------------------------------------------------------------
# the cases (shared by the emulated and the GPU tier)
# --------------------------------------------------------------------------------------
# (id, dict(B, grid, C, dtype, layout, norm params, op kwargs)); C=24 takes the 16-byte path for
# fp32 and fp16/bf16, the slice / transposed / C=30 cases the scalar path.
def _c(id_, kw, *, b=2, c=24, dtype=torch.float32, layout="contiguous", affine=(True, True),
       factor=2.0, grad_layout="contiguous"):
    return pytest.param(dict(kw=kw, b=b, c=c, dtype=dtype, layout=layout, affine=affine, factor=factor,
                             grad_layout=grad_layout), id=id_)


CASES = [
    # modes on odd grids, stride != kernel (overlaps and gaps)
    _c("avg-27x27-k2", dict(grid=(27, 27), mode="avg", kernel_size=2)),
    _c("avg-9x13-k3s2", dict(grid=(9, 13), mode="avg", kernel_size=3, stride=2)),
    _c("avg-9x13-k2x3s3x1", dict(grid=(9, 13), mode="avg", kernel_size=(2, 3), stride=(3, 1))),
    _c("max-27x27-k2", dict(grid=(27, 27), mode="max", kernel_size=2)),
    _c("max-9x13-k3s2", dict(grid=(9, 13), mode="max", kernel_size=3, stride=2)),
    _c("max-9x13-k2s3-gaps", dict(grid=(9, 13), mode="max", kernel_size=2, stride=3)),
    _c("bilinear-27x27-14x14", dict(grid=(27, 27), mode="bilinear")),
    _c("bilinear-9x13-4x20", dict(grid=(9, 13), mode="bilinear", output_size=(4, 20))),
    _c("bilinear-9x13-identity", dict(grid=(9, 13), mode="bilinear", output_size=(9, 13))),
    _c("bilinear-5x3-17x2-up", dict(grid=(5, 3), mode="bilinear", output_size=(17, 2))),
    _c("merge-8x6-k2", dict(grid=(8, 6), mode="merge", kernel_size=2)),
    _c("merge-9x12-k3", dict(grid=(9, 12), mode="merge", kernel_size=3)),
    _c("merge-8x9-k2x3", dict(grid=(8, 9), mode="merge", kernel_size=(2, 3))),
    # fused norms (Gemma 3: avg + RMSNorm; InternVL: merge + LayerNorm(4C))
    _c("avg-rms", dict(grid=(12, 9), mode="avg", kernel_size=3, norm="rmsnorm", eps=1e-5), c=40),
    _c("merge-ln", dict(grid=(12, 10), mode="merge", kernel_size=2, norm="layernorm", eps=1e-5), c=40),
    _c("bilinear-ln", dict(grid=(12, 9), mode="bilinear", norm="layernorm"), c=40),
    _c("max-rms-k3s2", dict(grid=(12, 9), mode="max", kernel_size=3, stride=2, norm="rmsnorm"), c=40),
    _c("avg-ln-no-affine", dict(grid=(9, 9), mode="avg", kernel_size=2, stride=1, norm="layernorm"),
       c=33, affine=(False, False)),
    _c("bilinear-rms-weight-only", dict(grid=(9, 9), mode="bilinear", output_size=(5, 4), norm="rmsnorm"),
       c=33, affine=(True, False)),
    # CLS dropped / kept (the kept row is normed like the others)
    _c("cls-avg-drop", dict(grid=(9, 10), mode="avg", kernel_size=2, has_cls=True)),
    _c("cls-max-keep", dict(grid=(9, 10), mode="max", kernel_size=3, stride=2, has_cls=True, keep_cls=True)),
    _c("cls-bilinear-keep-ln", dict(grid=(9, 10), mode="bilinear", has_cls=True, keep_cls=True, norm="layernorm")),
    _c("cls-merge-drop-ln", dict(grid=(10, 8), mode="merge", kernel_size=2, has_cls=True, norm="layernorm")),
    _c("cls-merge-drop", dict(grid=(10, 8), mode="merge", kernel_size=2, has_cls=True)),
    # strided inputs (scalar path) and odd widths
    _c("slice-avg", dict(grid=(10, 10), mode="avg", has_cls=True), layout="slice"),
    _c("slice-bilinear-rms", dict(grid=(10, 10), mode="bilinear", has_cls=True, norm="rmsnorm"), layout="slice"),
    _c("slice-merge-ln", dict(grid=(10, 10), mode="merge", has_cls=True, norm="layernorm"), layout="slice"),
    _c("transposed-max", dict(grid=(10, 10), mode="max", kernel_size=3, stride=2, has_cls=True),
       layout="transposed"),
    _c("transposed-merge-ln", dict(grid=(10, 10), mode="merge", has_cls=True, norm="layernorm"),
       layout="transposed"),
    _c("c30-avg-ln", dict(grid=(7, 7), mode="avg", kernel_size=2, norm="layernorm"), c=30),
    _c("c5-bilinear", dict(grid=(7, 6), mode="bilinear", output_size=(3, 4)), c=5),
    # rows wider than one block's threads (several vectors per thread) and wide fused norms
    _c("wide-avg-rms", dict(grid=(4, 4), mode="avg", norm="rmsnorm"), b=1, c=2100),
    _c("wide-merge-ln", dict(grid=(4, 4), mode="merge", norm="layernorm"), b=1, c=1100),
    # non-contiguous grad_out
    _c("grad-permuted-max", dict(grid=(8, 8), mode="max", kernel_size=3, stride=2), grad_layout="permuted"),
    _c("grad-expanded-bilinear-ln", dict(grid=(8, 8), mode="bilinear", norm="layernorm"),
       grad_layout="expanded"),
    _c("grad-permuted-merge-rms", dict(grid=(8, 8), mode="merge", norm="rmsnorm"), grad_layout="permuted"),
    # low precision (16-byte path: 8 channels per vector)
    _c("bf16-avg4-rms", dict(grid=(16, 16), mode="avg", kernel_size=4, norm="rmsnorm"), dtype=torch.bfloat16,
       c=48),
    _c("bf16-bilinear-27x27", dict(grid=(27, 27), mode="bilinear"), dtype=torch.bfloat16),
    _c("bf16-max-k3s2", dict(grid=(9, 13), mode="max", kernel_size=3, stride=2), dtype=torch.bfloat16),
    _c("fp16-merge-ln-cls", dict(grid=(14, 14), mode="merge", has_cls=True, norm="layernorm", eps=1e-5),
       dtype=torch.float16),
    _c("fp16-bilinear-cls", dict(grid=(14, 14), mode="bilinear", has_cls=True), dtype=torch.float16),
    _c("bf16-slice-avg-ln", dict(grid=(9, 9), mode="avg", kernel_size=3, stride=2, norm="layernorm"),
       dtype=torch.bfloat16, layout="slice"),
]


def _inputs(p, device):
    kw = p["kw"]
    h, w = kw["grid"]
    n = h * w + int(kw.get("has_cls", False))
    x = _tokens(p["b"], n, p["c"], p["dtype"], p["layout"], device=device)
    wt = bs = None
    if kw.get("norm"):
        s = kw.get("kernel_size", 2) if kw["mode"] == "merge" else 1
        kh, kwid = (s, s) if isinstance(s, int) else s
        width = kh * kwid * p["c"]
        # fp16/bf16 models keep the norm in their dtype or in fp32: use both
        pdtype = torch.float32 if p["dtype"] == torch.bfloat16 else p["dtype"]
        wt, bs = _norm_params(width, pdtype, *p["affine"], device=device)
    return x, wt, bs


# --------------------------------------------------------------------------------------
# CPU: availability and check() reasons
# --------------------------------------------------------------------------------------
def test_import_touches_no_gpu_and_available_explains():
    code = ("import torch, mmkernels.kernels.token_pool_cuda as m; "
            "assert not torch.cuda.is_initialized(); r = m.available(); "
            "assert isinstance(r, list) and all(isinstance(s, str) and s for s in r); print(r)")
    res = subprocess.run([os.environ.get("PYTHON", "python3"), "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]


def test_available_reason_without_extension():
    from mmkernels import _ext

    if _ext.load() is not None and HAS_CUDA:
        assert tpc.available() == []
        return
    reasons = tpc.available()
    assert len(reasons) == 1 and "mmkernels._C" in reasons[0]
    assert _ext.unavailable_reason() in reasons[0], "the extension loader's own reason is passed on"


def test_check_reasons():
    x = torch.randn(2, 1 + 27 * 27, 24)
    spec = make_spec(x, mode="bilinear", has_cls=True)
    reasons = tpc.check(x, spec)
    assert len(reasons) == 1 and "CUDA tensors" in reasons[0] and "cpu" in reasons[0]

    x64 = x.double()
    assert any("float64" in r for r in tpc.check(x64, spec))
    wide = torch.randn(1, 16, 4000)
    assert any("fused norm over 16000 channels" in r
               for r in tpc.check(wide, make_spec(wide, mode="merge", kernel_size=2, norm="layernorm")))
    assert not any("norm" in r for r in tpc.check(wide, make_spec(wide, mode="merge", kernel_size=2)))
    up = torch.randn(1, 9, 8)
    assert any("upsampling" in r for r in tpc.check(up, make_spec(up, mode="bilinear", output_size=(30, 3))))
    assert any("tokens" in r for r in tpc.check(torch.randn(2, 50, 8), spec))
    assert tpc.check(torch.randn(2, 3), spec) and "(B, N, C)" in tpc.check(torch.randn(2, 3), spec)[0]


def test_geometry_codes_and_saved_layout():
    x = torch.randn(2, 1 + 9 * 10, 24)
    spec = make_spec(x, grid=(9, 10), mode="max", kernel_size=3, stride=2, has_cls=True, keep_cls=True,
                 norm="rmsnorm")
    assert tpc.geometry(spec) == [9, 10, 1, 3, 3, 2, 2, 4, 4, 1, 1, 2]
    argmax, y, stats = tpc.saved_like(x, spec)
    assert argmax.shape == (2, 16, 24) and argmax.dtype == torch.int16
    assert y.shape == (2, 17, 24) and y.dtype == x.dtype
    assert stats.shape == (2, 2, 17) and stats.dtype == torch.float32
    merge = make_spec(x[:, 1:82], mode="merge", kernel_size=3, norm="layernorm")
    assert tpc.geometry(merge) == [9, 9, 3, 3, 3, 3, 3, 3, 3, 0, 0, 1]
    assert [t.shape for t in tpc.saved_like(x[:, 1:82], merge)] == [(2, 2, 9)], "merge saves no y"
    assert tpc.saved_like(x[:, 1:], make_spec(x[:, 1:], grid=(9, 10), mode="avg")) == []


def test_header_constants_match():
    """The limits check() enforces are the ones csrc/token_pool.h compiles in."""
    header = (REPO / "csrc" / "token_pool.h").read_text()
    assert f"kMaxNormChannels = {tpc.MAX_NORM_CHANNELS};" in header
    assert f"kMaxBilinearRatio = {tpc.MAX_BILINEAR_RATIO};" in header
    for name, code in tpc.MODE_CODE.items():
        assert f"k{name.capitalize()} = {code}" in header
    assert "kLayerNorm = 1" in header and "kRMSNorm = 2" in header


def test_cpp_glue_compiles():
    """csrc/*.cpp (argument checks, stream, TORCH_LIBRARY registration) parsed by g++ against
    this torch's headers: .ci/run compiles only the .cu files, so without this the glue would
    first be compiled on a GPU machine.  The CPU wheel lacks the c10/cuda headers, which is why
    token_pool.cpp reaches the stream through c10's device-generic interface."""
    if HAS_CUDA:
        pytest.skip("a CUDA machine builds the extension itself (the GPU tests load it)")
    gxx, inc = shutil.which("g++"), _cuda_include()
    if gxx is None or inc is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_runtime_api.h)")
    import sysconfig

    from torch.utils import cpp_extension

    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13) \
        else "-std=c++17"
    flags = [std, "-fsyntax-only", "-Wall", "-Werror", f"-I{REPO / 'csrc'}", f"-isystem{inc}",
             f"-isystem{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=_C",
             "-DTORCH_API_INCLUDE_EXTENSION_H"]
    flags += [f"-isystem{p}" for p in cpp_extension.include_paths()]
    procs = {src.name: subprocess.Popen([gxx, *flags, str(src)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
             for src in sorted((REPO / "csrc").glob("*.cpp"))}
    assert procs, "csrc/ has no .cpp files"
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            failed[name] = out[-4000:]
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


# --------------------------------------------------------------------------------------
# CPU: the kernels under host emulation
# --------------------------------------------------------------------------------------
def _cuda_include() -> str | None:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    cands.append("/usr/local/cuda")
    for base in cands:
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            return str(Path(base) / "include")
    return None


class _Emu:
    """ctypes front of tests/cuda_emu/token_pool_entry.cpp, standing in for the extension's two
    launch primitives with the argument handling of csrc/token_pool.cpp (fp32 affine copies, the
    16-byte-path decision, the workspaces)."""

    DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def __init__(self, lib):
        self.lib = lib
        self.force_scalar = False
        i64, vp, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.mmk_tp_fwd.argtypes = [vp, i64, i64, i64, ctypes.c_double, i32, i32, vp, i64, i64, i64, vp, vp, vp,
                                   vp, vp, vp]
        lib.mmk_tp_norm_bwd_blocks.argtypes = [vp, i64, i64, i64, i32, i32]
        lib.mmk_tp_bwd.argtypes = [vp, i64, i64, i64, i32, i32, i32, vp, i64, i64, i64, vp, i64, i64, i64, vp,
                                   vp, vp, vp, vp, vp, vp, i32, vp, vp]

    @staticmethod
    def _p(t):
        return ctypes.c_void_p(t.data_ptr()) if t is not None and t.numel() > 0 else None

    @staticmethod
    def _vector_ok(t, channels):
        e = 4 if t.dtype == torch.float32 else 8
        s = t.stride()
        return s[2] == 1 and channels % e == 0 and s[1] % e == 0 and s[0] % e == 0 and t.data_ptr() % 16 == 0

    @staticmethod
    def _geom(geom):
        return (ctypes.c_int64 * len(geom))(*geom)

    @staticmethod
    def _affine(t):
        return t.float().contiguous() if t is not None else None

    def fwd(self, x, geom, eps, weight, bias, out, argmax, y, stats):
        w, b = self._affine(weight), self._affine(bias)
        al = lambda t: t.numel() == 0 or t.data_ptr() % 16 == 0  # noqa: E731
        vec = self._vector_ok(x, x.shape[2]) and al(out) and al(argmax) and al(y) and not self.force_scalar
        rc = self.lib.mmk_tp_fwd(self._geom(geom), *x.shape, eps, self.DT[x.dtype], int(vec), self._p(x),
                                 *x.stride(), self._p(out), self._p(w), self._p(b), self._p(argmax), self._p(y),
                                 self._p(stats))
        assert rc == 0, f"launch_fwd returned cudaError {rc}"

    def bwd(self, grad_out, x, geom, weight, argmax, y, stats, dx, dweight, dbias):
        w = self._affine(weight)
        b_, n, c = x.shape
        mode, norm = geom[2], geom[11]
        c_out = geom[3] * geom[4] * c if mode == 3 else c
        n_out = geom[7] * geom[8] + geom[10]
        e = 4 if x.dtype == torch.float32 else 8
        aux = dx.data_ptr() % 16 == 0 and (mode != 1 or argmax.data_ptr() % 16 == 0)
        vec_gather = self._vector_ok(grad_out, c_out) and c % e == 0 and aux and not self.force_scalar
        saves_y = norm != 0 and mode != 3
        vec_norm = vec_gather and (y.data_ptr() % 16 == 0 if saves_y else self._vector_ok(x, c))
        dy_ws = partial = None
        n_partial = 1
        dt = self.DT[x.dtype]
        if norm:
            if mode != 3:
                dy_ws = torch.full((b_, n_out, c_out), float("nan"))
            n_partial = self.lib.mmk_tp_norm_bwd_blocks(self._geom(geom), b_, n, c, dt, int(vec_norm))
            partial = torch.full((2, n_partial, c_out), float("nan"))
        rc = self.lib.mmk_tp_bwd(self._geom(geom), b_, n, c, dt, int(vec_norm), int(vec_gather), self._p(grad_out),
                                 *grad_out.stride(), self._p(x), *x.stride(), self._p(w), self._p(argmax), self._p(y),
                                 self._p(stats), self._p(dx), self._p(dy_ws), self._p(partial), n_partial,
                                 self._p(dweight), self._p(dbias))
        assert rc == 0, f"launch_bwd returned cudaError {rc}"


@pytest.fixture(scope="session")
def emu_lib(tmp_path_factory):
    gxx, inc = shutil.which("g++"), _cuda_include()
    if gxx is None or inc is None:
        pytest.skip("the host emulation needs g++ and the CUDA headers (cuda_fp16.h); neither CUDA_HOME nor nvcc "
                    "points at them")
    out = tmp_path_factory.mktemp("token_pool_emu") / "libtoken_pool_emu.so"
    cmd = [gxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-DMMK_HOST_EMULATION",
           f"-I{REPO / 'csrc'}", f"-I{inc}", str(REPO / "tests" / "cuda_emu" / "token_pool_entry.cpp"),
           "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, "host emulation build failed:\n" + " ".join(cmd) + "\n" + res.stderr[-6000:]
    return ctypes.CDLL(str(out))


@pytest.fixture
def emu(emu_lib, monkeypatch):
    e = _Emu(emu_lib)
    monkeypatch.setattr(tpc, "_launch_fwd", e.fwd)
    monkeypatch.setattr(tpc, "_launch_bwd", e.bwd)
    return e


@pytest.mark.parametrize("p", CASES)
def test_emulated(emu, p):
    x, w, b = _inputs(p, "cpu")
    out, do, grads = _run_module(x, w, b, p["kw"], p["grad_layout"])
    _compare(out, grads, x, w, b, do, p["factor"], p["kw"])
    if not p["kw"].get("keep_cls", False) and p["kw"].get("has_cls", False):
        assert (grads[0][:, 0] == 0).all(), "the dropped CLS token gets a zero gradient"


@pytest.mark.parametrize("mode,kw", [("avg", dict(kernel_size=3, stride=2)),
                                     ("max", dict(kernel_size=3, stride=2)),
                                     ("bilinear", dict(norm="rmsnorm")),
                                     ("merge", dict(kernel_size=2, norm="layernorm"))])
def test_emulated_scalar_path_equals_vector_path(emu, mode, kw):
    """The same aligned input through the 16-byte and the scalar path: without a norm bitwise
    equal (the same fp32 operations per element); with one, the block reductions sum in another
    order, so equal to a few ulps."""
    x = torch.randn(2, 1 + 10 * 10, 32)
    w, b = _norm_params(128 if mode == "merge" else 32, torch.float32) if "norm" in kw else (None, None)
    wd, bd = (w.detach(), b.detach()) if w is not None else (None, None)
    spec = make_spec(x, mode=mode, has_cls=True, **kw)
    res = []
    for scalar in (False, True):
        emu.force_scalar = scalar
        out, saved = tpc.forward(x, spec, wd, bd)
        grads = tpc.backward(torch.ones_like(out).cumsum(-1).sin(), x, spec, wd, bd, saved)
        res.append([out, *saved, *[g for g in grads if g is not None]])
    for a, c in zip(*res):
        if "norm" in kw:
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, c)


def test_emulated_max_ties_follow_pytorch(emu):
    """Integer-valued input has many ties: the gradient goes to the first maximum in row-major
    window order, as in F.max_pool2d."""
    x = torch.randint(0, 3, (2, 81, 24)).float().requires_grad_()
    kw = dict(mode="max", kernel_size=3, stride=2)
    out, do, grads = _run_module(x, None, None, kw)
    _compare(out, grads, x, None, None, do, 2.0, kw)


def test_emulated_norm_backward_is_deterministic(emu):
    x = torch.randn(3, 12 * 12, 40)
    w, b = _norm_params(160, torch.float32)
    spec = make_spec(x, mode="merge", kernel_size=2, norm="layernorm")
    out, saved = tpc.forward(x, spec, w.detach(), b.detach())
    do = torch.randn_like(out)
    first = tpc.backward(do, x, spec, w.detach(), b.detach(), saved)
    second = tpc.backward(do, x, spec, w.detach(), b.detach(), saved)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_emulated_keep_cls_row_is_the_cls_token(emu):
    x = torch.randn(1, 1 + 36, 24)
    spec = make_spec(x, mode="avg", has_cls=True, keep_cls=True)
    out, _ = tpc.forward(x, spec, None, None)
    assert out.shape == (1, 1 + 9, 24) and torch.equal(out[:, 0], x[:, 0])


# --------------------------------------------------------------------------------------
# GPU: the built extension
# --------------------------------------------------------------------------------------
def _require_extension():
    reasons = tpc.available()
    if reasons:
        if os.environ.get("MMKERNELS_REQUIRE_CUDA_EXT", "") == "1":
            pytest.fail("MMKERNELS_REQUIRE_CUDA_EXT=1 but the CUDA backend is unavailable: " + "; ".join(reasons))
        pytest.skip("; ".join(reasons))


@pytest.mark.gpu
@pytest.mark.parametrize("p", CASES)
def test_gpu(p):
    _require_extension()
    x, w, b = _inputs(p, DEVICE)
    out, do, grads = _run_op(x, w, b, p["kw"], p["grad_layout"])
    _compare(out, grads, x, w, b, do, p["factor"], p["kw"])


@pytest.mark.gpu
@pytest.mark.parametrize("p", [c for c in CASES if c.id in ("avg-rms", "merge-ln", "bilinear-ln", "max-9x13-k3s2")])
def test_gpu_module_level_matches_op(p):
    """token_pool_cuda.forward / backward called directly (poisoned, saved layout checked)."""
    _require_extension()
    x, w, b = _inputs(p, DEVICE)
    out, do, grads = _run_module(x, w, b, p["kw"], p["grad_layout"])
    _compare(out, grads, x, w, b, do, p["factor"], p["kw"])


@pytest.mark.gpu
def test_gpu_model_shapes_bf16():
    """The issue's shapes, batch cut down: LLaVA-OneVision bilinear 27x27 -> 14x14 (C=1152),
    Gemma 3 avg 4 + RMSNorm (64x64, C=1152), InternVL merge + LayerNorm(4C) (32x32, C=1024),
    LLaVA-NeXT-Video avg 2 (24x24, C=1024)."""
    _require_extension()
    for (h, c), kw, norm_w in [
        ((27, 1152), dict(mode="bilinear"), 0),
        ((64, 1152), dict(mode="avg", kernel_size=4, norm="rmsnorm"), 1152),
        ((32, 1024), dict(mode="merge", kernel_size=2, norm="layernorm"), 4096),
        ((24, 1024), dict(mode="avg", kernel_size=2), 0),
    ]:
        x = _tokens(2, h * h, c, torch.bfloat16, device=DEVICE)
        w, b = _norm_params(norm_w, torch.float32, device=DEVICE) if norm_w else (None, None)
        out, do, grads = _run_op(x, w, b, kw)
        _compare(out, grads, x, w, b, do, 2.0, kw)


@pytest.mark.gpu
def test_gpu_vector_path_alignment_fallback():
    """A tensor whose base is 2 bytes off 16-byte alignment takes the scalar path, same result."""
    _require_extension()
    base = torch.randn(2 * 100 * 24 + 1, device=DEVICE)
    x = base[1:].view(2, 100, 24).requires_grad_()
    kw = dict(mode="bilinear", norm="layernorm")
    out, do, grads = _run_op(x, None, None, kw)
    _compare(out, grads, x, None, None, do, 2.0, kw)
