"""mmkernels.token_pool on the Triton path (interpreter on CPU, real kernels on CUDA).

Every case: fresh random inputs, outputs poisoned with NaN before launch, forward and all
gradients (x, norm weight, norm bias) compared with the float64 reference — the eager chain the
models run (F.avg_pool2d / F.max_pool2d / F.interpolate / view-permute, F.layer_norm) — by the
2x-PyTorch rule: error <= 2 × (error of the same reference run in the kernel's dtype) + floor.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, assert_close_rule, poisoned
from token_pool_helpers import norm_params, reference, tokens

import mmkernels as mk
from mmkernels.kernels.token_pool import TokenPoolSpec, saved_like
from mmkernels.ops.token_pool import _spec_args, make_spec
from mmkernels.reference.token_pool import token_pool as ref_token_pool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def check(x, w=None, b=None, factor=2.0, **kw):
    """Forced Triton vs float64 reference: output and the gradients of x, weight, bias."""
    with poisoned(), mk.use_backend("triton"):
        out = mk.token_pool(x, norm_weight=w, norm_bias=b, **kw)
        do = torch.randn_like(out)
        wrt = [t for t in (x, w, b) if t is not None]
        grads = torch.autograd.grad(out, wrt, do)
    out64, grads64 = reference(x, w, b, do, torch.float64, kw)
    outlp, gradslp = reference(x, w, b, do, x.dtype, kw)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert_close_rule("out", out, out64, outlp, factor)
    for name, g, g64, glp in zip(("dx", "dweight", "dbias"), grads, grads64, gradslp):
        assert_close_rule(name, g, g64, glp, factor)
    return out, grads


# (mode, grid, kw) on B=2, C=24 fp32: odd grids, stride != kernel (overlap and gaps), pairs
CASES = [
    ("avg", (27, 27), dict(kernel_size=2)),                      # 13x13: last row/col dropped
    ("avg", (9, 13), dict(kernel_size=3, stride=2)),             # overlapping windows
    ("avg", (9, 13), dict(kernel_size=(2, 3), stride=(3, 1))),   # gaps along h
    ("max", (27, 27), dict(kernel_size=2)),
    ("max", (9, 13), dict(kernel_size=3, stride=2)),
    ("max", (9, 13), dict(kernel_size=2, stride=3)),             # gaps: uncovered cells get 0
    ("bilinear", (27, 27), dict()),                              # default 14x14 (LLaVA-OneVision)
    ("bilinear", (9, 13), dict(output_size=(4, 20))),            # down along h, up along w
    ("bilinear", (9, 13), dict(output_size=(9, 13))),            # identity size
    ("merge", (8, 6), dict(kernel_size=2)),
    ("merge", (9, 12), dict(kernel_size=3)),
    ("merge", (8, 9), dict(kernel_size=(2, 3))),
]


def _case_id(case):
    mode, (h, w), kw = case
    extra = "-".join(f"{k[0]}{'x'.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in kw.items())
    return f"{mode}-{h}x{w}" + (f"-{extra}" if extra else "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_modes_fp32(case):
    mode, (h, w), kw = case
    x = tokens(2, h * w, 24)
    check(x, grid=(h, w), mode=mode, **kw)


@pytest.mark.parametrize(
    "mode,norm,kw",
    [
        ("avg", "rmsnorm", dict(kernel_size=3)),                  # Gemma 3: avg + RMSNorm
        ("merge", "layernorm", dict(kernel_size=2)),              # InternVL: merge + LayerNorm(4C)
        ("bilinear", "layernorm", dict()),
        ("max", "rmsnorm", dict(kernel_size=3, stride=2)),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_fused_norm(mode, norm, kw):
    (h, w), c = ((12, 10) if mode == "merge" else (12, 9)), 40
    x = tokens(2, h * w, c)
    width = c * 4 if mode == "merge" else c
    wt, bs = norm_params(width, torch.float32)
    check(x, wt, bs, grid=(h, w), mode=mode, norm=norm, eps=1e-5, **kw)


def test_norm_without_affine_params():
    x = tokens(2, 81, 33)
    check(x, mode="avg", kernel_size=2, stride=1, norm="layernorm")
    w, _ = norm_params(33, torch.float32, bias=False)
    check(x, w, mode="bilinear", output_size=(5, 4), norm="rmsnorm")


@pytest.mark.parametrize(
    "mode,kw",
    [("avg", dict(kernel_size=2, has_cls=True)),
     ("max", dict(kernel_size=3, stride=2, has_cls=True, keep_cls=True)),
     ("bilinear", dict(has_cls=True, keep_cls=True, norm="layernorm")),
     ("merge", dict(kernel_size=2, has_cls=True, norm="layernorm"))],
    ids=["avg-drop", "max-keep", "bilinear-keep-ln", "merge-drop-ln"],
)
def test_cls(mode, kw):
    (h, w), c = ((10, 8) if mode == "merge" else (9, 10)), 24
    x = tokens(2, 1 + h * w, c)
    wt = bs = None
    if kw.get("norm"):
        wt, bs = norm_params(4 * c if mode == "merge" else c, torch.float32)
    out, grads = check(x, wt, bs, grid=(h, w), mode=mode, **kw)
    if not kw.get("keep_cls"):
        assert (grads[0][:, 0] == 0).all(), "the dropped CLS token gets a zero gradient"


def test_keep_cls_row_is_the_cls_token():
    x = tokens(1, 1 + 36, 24)
    with mk.use_backend("triton"):
        out = mk.token_pool(x, mode="avg", has_cls=True, keep_cls=True)
    assert out.shape == (1, 1 + 9, 24)
    assert torch.equal(out[:, 0], x[:, 0].detach())


@pytest.mark.parametrize("layout", ["slice", "transposed"])
@pytest.mark.parametrize("mode,norm", [("avg", None), ("bilinear", "rmsnorm"), ("merge", "layernorm")],
                         ids=["avg", "bilinear-rms", "merge-ln"])
def test_non_contiguous_input(layout, mode, norm):
    x = tokens(2, 1 + 100, 24, layout=layout)
    assert not x.is_contiguous()
    wt, bs = norm_params(96 if mode == "merge" else 24, torch.float32) if norm else (None, None)
    check(x, wt, bs, mode=mode, has_cls=True, norm=norm)


def test_non_contiguous_grad_output():
    x = tokens(2, 64, 24)
    with poisoned(), mk.use_backend("triton"):
        out = mk.token_pool(x, mode="max", kernel_size=3, stride=2)
        do = torch.randn(out.shape[2], out.shape[1], 2, device=DEVICE).permute(2, 1, 0)
        (dx,) = torch.autograd.grad(out, x, do)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(ref_token_pool(x64, mode="max", kernel_size=3, stride=2), x64, do.double())
    assert_close_abs("dx", dx, dx64, 1e-6)


def test_max_ties_follow_pytorch():
    """Integer-valued input has many ties: the gradient goes to the first maximum in row-major
    window order, as in F.max_pool2d."""
    x = torch.randint(0, 3, (2, 81, 24), device=DEVICE).float().requires_grad_()
    check(x, mode="max", kernel_size=3, stride=2)


def test_bilinear_size_sweep():
    """Bilinear gather vs reference over down/up/mixed ratios (taps recomputed exactly)."""
    for (h, w), size in [((7, 5), (3, 11)), ((27, 13), (14, 1)), ((1, 6), (4, 3)), ((16, 10), (5, 10)),
                         ((5, 3), (17, 2))]:
        x = tokens(1, h * w, 5)
        check(x, grid=(h, w), mode="bilinear", output_size=size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(dtype):
    if dtype == torch.bfloat16:  # Gemma-3-like: avg 4x4 + RMSNorm with (1 + w) weights in fp32
        x = tokens(2, 16 * 16, 48, dtype)
        wt, _ = norm_params(48, torch.float32, bias=False)
        check(x, wt, mode="avg", kernel_size=4, norm="rmsnorm", factor=2.0)
    else:  # InternVL-like: merge 2x2 + LayerNorm(4C) in the model's dtype; and bilinear
        x = tokens(2, 1 + 14 * 14, 24, dtype)
        wt, bs = norm_params(96, dtype)
        check(x, wt, bs, mode="merge", has_cls=True, norm="layernorm", eps=1e-5)
        check(x, mode="bilinear", has_cls=True)


def test_inference_saves_nothing():
    """Without autograd the forward writes no argmax / pre-norm rows, and the output is unchanged."""
    x = torch.randn(2, 81, 24, device=DEVICE)
    w, b = norm_params(24, torch.float32)
    spec = make_spec(x, mode="max", kernel_size=3, stride=2, norm="layernorm")
    with poisoned(), torch.no_grad():
        out, saved = torch.ops.mmkernels.token_pool_fwd(x, w, b, "triton", *_spec_args(spec), False)
        expected = mk.token_pool(x, mode="max", kernel_size=3, stride=2, norm="layernorm", norm_weight=w,
                                 norm_bias=b, backend="reference")
    assert saved == []
    assert_close_abs("out", out, expected, 1e-5)


def test_saved_tensors_match_saved_like():
    x = torch.randn(2, 1 + 45, 24, device=DEVICE)
    from mmkernels.kernels import token_pool as kernels

    for mode, norm in [("max", "layernorm"), ("avg", "rmsnorm"), ("merge", "layernorm"), ("bilinear", None)]:
        spec = make_spec(x, grid=(5, 9) if mode != "merge" else (5, 9), mode=mode,
                         kernel_size=(1, 3) if mode == "merge" else 2, has_cls=True, norm=norm)
        _, saved = kernels.forward(x, spec)
        like = saved_like(x, spec)
        assert [(t.shape, t.dtype) for t in saved] == [(t.shape, t.dtype) for t in like], (mode, norm)


# ---------------------------------------------------------------- registration / compile
def test_opcheck():
    x = torch.randn(2, 1 + 63, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    bias = torch.randn(24, device=DEVICE, requires_grad=True)
    fwd = torch.ops.mmkernels.token_pool_fwd.default
    for kw, wb in [
        (dict(grid=(7, 9), mode="max", kernel_size=3, stride=2, has_cls=True, keep_cls=True, norm="layernorm"),
         (w, bias)),
        (dict(grid=(7, 9), mode="bilinear", has_cls=True), (None, None)),
        (dict(grid=(7, 9), mode="avg", kernel_size=(1, 3), has_cls=True, norm="rmsnorm"), (w, None)),
    ]:
        spec = make_spec(x, **kw)
        torch.library.opcheck(fwd, (x, *wb, "triton", *_spec_args(spec), True))
    torch.library.opcheck(fwd, (x.detach(), None, None, "triton", *_spec_args(spec), False))
    x2 = torch.randn(2, 8 * 6, 24, device=DEVICE, requires_grad=True)
    w2 = torch.randn(96, device=DEVICE, requires_grad=True)
    spec = make_spec(x2, grid=(8, 6), mode="merge", norm="layernorm")
    torch.library.opcheck(fwd, (x2, w2, None, "triton", *_spec_args(spec), True))
    out, saved = fwd(x2, w2, None, "triton", *_spec_args(spec), True)
    torch.library.opcheck(torch.ops.mmkernels.token_pool_bwd.default,
                          (torch.randn_like(out), x2.detach(), w2.detach(), None, saved, "triton", *_spec_args(spec)))


def test_compile_fullgraph_aot_eager():
    x = torch.randn(2, 1 + 81, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)

    def f(x, w):
        y = mk.token_pool(x, mode="avg", kernel_size=3, stride=2, has_cls=True, keep_cls=True,
                          norm="rmsnorm", norm_weight=1.0 + w.float())
        return (y * 2).sum(-1)

    with mk.use_backend("triton"):
        expected = f(x, w)
        g_expected = torch.autograd.grad(expected.sum(), (x, w))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(x, w)
        grads = torch.autograd.grad(out.sum(), (x, w))
    assert_close_abs("compiled out", out, expected, 1e-6)
    for a, b in zip(grads, g_expected):
        assert_close_abs("compiled grad", a, b, 1e-6)


# ---------------------------------------------------------------- dispatch
def test_auto_uses_triton_and_float64_goes_toreference():
    from mmkernels import dispatch

    x = torch.randn(1, 16, 8, device=DEVICE)
    spec = make_spec(x)
    assert dispatch.select("token_pool", dict(x=x, spec=spec, norm_weight=None, norm_bias=None)).name == "triton"
    x64 = x.double()
    chosen = dispatch.select("token_pool", dict(x=x64, spec=make_spec(x64), norm_weight=None, norm_bias=None))
    assert chosen.name == "reference"
    with mk.use_backend("triton"), pytest.raises(mk.BackendNotSupportedError, match="float64"):
        mk.token_pool(x64)


def test_forced_cuda_on_cpu_explains():
    x = torch.randn(1, 16, 8)
    with pytest.raises(mk.BackendNotSupportedError, match="cuda"):
        mk.token_pool(x, backend="cuda")


def test_spec_defaults():
    x = torch.randn(1, 1 + 27 * 27, 8)
    assert make_spec(x, has_cls=True, mode="bilinear") == TokenPoolSpec(27, 27, "bilinear", 1, 1, 1, 1, 14, 14, True)
    assert make_spec(x, has_cls=True, kernel_size=2).oh == 13
    s = make_spec(torch.randn(1, 8 * 6, 8), grid=(8, 6), mode="merge", norm="layernorm")
    assert (s.kh, s.sh, s.oh, s.ow, s.c_out(8), s.n_out) == (2, 2, 4, 3, 32, 12)


# ---------------------------------------------------------------- bad input
BAD = [
    (dict(grid=(5, 5)), "grid"),                                        # 36 tokens != 25
    (dict(), "grid"),                                                   # 35 tokens is not a square
    (dict(grid=(5, 7), mode="merge"), "grid"),                          # not divisible by 2
    (dict(grid=(5, 7), mode="mean"), "mode"),
    (dict(grid=(5, 7), norm="batchnorm"), "norm"),
    (dict(grid=(5, 7), norm="layernorm", norm_weight=torch.ones(7)), "norm_weight"),
    (dict(grid=(5, 7), norm="layernorm", norm_bias=torch.ones(8, dtype=torch.int64)), "norm_bias"),
    (dict(grid=(5, 7), norm_weight=torch.ones(8)), "norm_weight"),      # weight without a norm
    (dict(grid=(5, 7), kernel_size=0), "kernel_size"),
    (dict(grid=(5, 7), kernel_size=6), "kernel_size"),                  # window larger than the grid
    (dict(grid=(5, 7), stride=(1, 2, 3)), "stride"),
    (dict(grid=(5, 7), output_size=(2, 2)), "output_size"),             # not bilinear
    (dict(grid=(5, 7), keep_cls=True), "keep_cls"),                     # no CLS to keep
    (dict(grid=(5, 7), eps=-1.0), "eps"),
]


@pytest.mark.parametrize("kw,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_input(kw, name):
    x = torch.randn(2, 35, 8)
    with pytest.raises(ValueError, match=name):
        mk.token_pool(x, **kw)


def test_bad_tensors():
    with pytest.raises(ValueError, match="x"):
        mk.token_pool(torch.randn(35, 8))
    with pytest.raises(ValueError, match="x"):
        mk.token_pool(torch.randint(0, 3, (1, 36, 8)))
    with pytest.raises(ValueError, match="keep_cls"):
        mk.token_pool(torch.randn(1, 37, 8), mode="merge", grid=(6, 6), has_cls=True, keep_cls=True)
    with pytest.raises(ValueError, match=r"x: expected at least one channel \(C > 0\)"):
        mk.token_pool(torch.randn(2, 16, 0))


def test_empty_batch_gives_empty_result():
    out = mk.token_pool(torch.randn(0, 16, 8, device=DEVICE), mode="avg", norm="rmsnorm")
    assert out.shape == (0, 4, 8)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="norm_weight"):
            mk.token_pool(torch.randn(1, 36, 8, device="cuda"), norm="rmsnorm", norm_weight=torch.ones(8))
