"""``mmkernels.token_pool``: fused visual-token pooling (avg / max / bilinear / merge + norm).

Layers: validation and defaulting into a :class:`~mmkernels.kernels.token_pool.TokenPoolSpec`
(``ValueError`` naming the argument) → dispatch (triton | cuda | reference, see
:mod:`mmkernels.dispatch`) → for the fused backends, the ``torch.library`` ops
``mmkernels::token_pool_fwd`` / ``mmkernels::token_pool_bwd`` with ``register_fake`` and
``register_autograd``.  Both fused backends (Triton, ``kernels/token_pool.py``; CUDA C++,
``kernels/token_pool_cuda.py``) implement the same ``forward(x, spec, weight, bias)`` /
``backward(grad_out, x, spec, weight, bias, saved)`` pair, so one op pair serves both with an
``impl`` string argument; the spec travels as plain ints/str/float (custom ops take no
dataclasses).
"""

from __future__ import annotations

import math
from typing import Optional, TypedDict

import torch

from .. import dispatch
from .._token_pool_spec import MODES, NORMS, TokenPoolSpec
from .._utils import (
    assume_constant_result,
    contiguous_outputs,
    describe,
    empty_contiguous,
    kernel_reasons,
    triton_device_reason,
    triton_reasons,
)
from ..dispatch import Reason
from ..reference import token_pool as ref

__all__ = ["token_pool", "make_spec", "check_options"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Inputs(TypedDict):
    """What every backend receives (``check(inputs)``, ``run(**inputs)``), built once per call:
    the validated :class:`TokenPoolSpec` and the norm's weight/bias (None without one)."""

    x: torch.Tensor
    spec: TokenPoolSpec
    norm_weight: Optional[torch.Tensor]
    norm_bias: Optional[torch.Tensor]


# --------------------------------------------------------------------------------------
# implementations behind the ops (imported lazily: the CUDA one may be absent)
# --------------------------------------------------------------------------------------
def _impl(name: str):
    if name == "triton":
        from ..kernels import token_pool as mod
    elif name == "cuda":
        from ..kernels import token_pool_cuda as mod
    else:
        raise ValueError(f"impl: expected 'triton' or 'cuda', got {name!r}")
    return mod


def _spec_args(spec: TokenPoolSpec) -> tuple[list[int], str, str, float]:
    geometry = [spec.h, spec.w, spec.kh, spec.kw, spec.sh, spec.sw, spec.oh, spec.ow,
                int(spec.has_cls), int(spec.keep_cls)]
    return geometry, spec.mode, spec.norm or "", float(spec.eps)


def _spec_from_args(geometry: list[int], mode: str, norm: str, eps: float) -> TokenPoolSpec:
    # a symbolic size (the fake kernels under torch.compile(dynamic=True): Qwen2VLPatchMerger's
    # grid is (packed length, 1)) stays symbolic: int() would specialise it, one recompile per length
    h, w, kh, kw, sh, sw, oh, ow, has_cls, keep_cls = (v if isinstance(v, torch.SymInt) else int(v) for v in geometry)
    return TokenPoolSpec(h, w, mode, kh, kw, sh, sw, oh, ow, bool(has_cls), bool(keep_cls), norm or None, float(eps))


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The fused kernels index the (C_out,) norm weight / bias with unit stride: an expanded
    (stride 0) or sliced one is copied here — C_out elements, nothing next to the pass over x."""
    return t if t is None else t.contiguous()


# --------------------------------------------------------------------------------------
# torch.library ops (fused backends)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("mmkernels::token_pool_fwd", mutates_args=())
def _token_pool_fwd(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    impl: str,
    geometry: list[int],
    mode: str,
    norm: str,
    eps: float,
    save: bool,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(out, saved); ``save=False`` (no gradient needed) returns no saved tensors and, on the
    Triton path, skips writing them."""
    spec = _spec_from_args(geometry, mode, norm, eps)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    if impl == "triton":
        from ..kernels import token_pool as kernels

        out, saved = kernels.forward(x, spec, weight, bias, save=save)
    else:
        out, saved = _impl(impl).forward(x, spec, weight, bias)
    return out, (list(saved) if save else [])


@_token_pool_fwd.register_fake
def _(x, weight, bias, impl, geometry, mode, norm, eps, save):
    spec = _spec_from_args(geometry, mode, norm, eps)
    b, _, c = x.shape
    # each implementation declares the shapes of what it saves (kernels/token_pool.py: saved_like)
    return x.new_empty((b, spec.n_out, spec.c_out(c))), (_impl(impl).saved_like(x, spec) if save else [])


@torch.library.custom_op("mmkernels::token_pool_bwd", mutates_args=())
def _token_pool_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    saved: list[torch.Tensor],
    impl: str,
    geometry: list[int],
    mode: str,
    norm: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight / dbias are empty (0,) tensors when weight / bias are None
    (custom ops cannot return None)."""
    spec = _spec_from_args(geometry, mode, norm, eps)
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    dx, dw, db = _impl(impl).backward(grad_out, x, spec, weight, bias, list(saved))
    return contiguous_outputs(dx, dw if dw is not None else x.new_empty((0,)),
                              db if db is not None else x.new_empty((0,)))


@_token_pool_bwd.register_fake
def _(grad_out, x, weight, bias, saved, impl, geometry, mode, norm, eps):
    return (empty_contiguous(x),
            empty_contiguous(weight) if weight is not None else x.new_empty((0,)),
            empty_contiguous(bias) if bias is not None else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, impl, geometry, mode, norm, eps, save = inputs
    _, saved = output
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
    ctx.save_for_backward(x, weight, bias, *saved)
    ctx.args = (impl, geometry, mode, norm, eps)
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, grad_out, grad_saved):
    x, weight, bias, *saved = ctx.saved_tensors
    dx, dw, db = _token_pool_bwd(grad_out, x, weight, bias, saved, *ctx.args)
    return (dx, dw if ctx.has_weight else None, db if ctx.has_bias else None, None, None, None, None, None, None)


_token_pool_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _pair(name: str, value) -> tuple[int, int]:
    """A positive int or a pair of positive ints, as (a, b)."""
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    if not ok:
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_options(*, grid=None, mode: str = "avg", kernel_size=2, stride=None, output_size=None,
                  has_cls: bool = False, keep_cls: bool = False, norm: str | None = None, eps: float = 1e-6) -> None:
    """The checks of a ``token_pool`` call that need no input (raises ValueError naming the argument):
    what :class:`mmkernels.nn.TokenPooler` runs at construction, and :func:`make_spec` at every call."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(map(repr, MODES))}, got {mode!r}")
    if norm is not None and norm not in NORMS:
        raise ValueError(f"norm: expected None, 'layernorm' or 'rmsnorm', got {norm!r}")
    if not isinstance(has_cls, bool) or not isinstance(keep_cls, bool):
        raise ValueError(f"has_cls/keep_cls: expected bools, got {has_cls!r}, {keep_cls!r}")
    if keep_cls and not has_cls:
        raise ValueError("keep_cls: keep_cls=True needs has_cls=True (there is no CLS token to keep)")
    if keep_cls and mode == "merge":
        raise ValueError("keep_cls: not available with mode='merge' (the CLS token has C channels, merged rows s²·C)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a float >= 0, got {eps!r}")
    if grid is not None:
        _pair("grid", grid)
    if output_size is not None and mode != "bilinear":
        raise ValueError(f"output_size: only used by mode='bilinear' (mode={mode!r}); use kernel_size/stride")
    if mode == "bilinear":
        if stride is not None:
            raise ValueError("stride: not used by mode='bilinear'; pass output_size")
        if output_size is not None:
            _pair("output_size", output_size)
        return
    kh, kw = _pair("kernel_size", kernel_size)
    if stride is not None:
        sh, sw = _pair("stride", stride)
        if mode == "merge" and (sh, sw) != (kh, kw):
            raise ValueError(f"stride: mode='merge' uses stride = kernel_size = {(kh, kw)}, got {stride!r}")


def make_spec(x: torch.Tensor, *, grid=None, mode: str = "avg", kernel_size=2, stride=None, output_size=None,
              has_cls: bool = False, keep_cls: bool = False, norm: str | None = None,
              eps: float = 1e-6) -> TokenPoolSpec:
    """Validate a ``token_pool`` call's geometry and fill in its defaults (raises ValueError)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x: expected a 3-D tensor (B, N, C) of tokens, got {describe(x)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating dtype (float16/bfloat16/float32/float64), got {describe(x)}")
    if x.shape[2] == 0:
        raise ValueError(f"x: expected at least one channel (C > 0) in (B, N, C), got {describe(x)}")
    check_options(grid=grid, mode=mode, kernel_size=kernel_size, stride=stride, output_size=output_size,
                  has_cls=has_cls, keep_cls=keep_cls, norm=norm, eps=eps)
    n_grid = x.shape[1] - int(has_cls)
    if grid is None:
        side = math.isqrt(max(n_grid, 0))
        if n_grid <= 0 or side * side != n_grid:
            raise ValueError(f"grid: x has {n_grid} grid tokens (N={x.shape[1]}, has_cls={has_cls}), not a square; "
                             "pass grid=(h, w)")
        h = w = side
    else:
        h, w = _pair("grid", grid)
        if h * w != n_grid:
            raise ValueError(f"grid: (h, w) = ({h}, {w}) has {h * w} cells but x has {n_grid} grid tokens "
                             f"(N={x.shape[1]}, has_cls={has_cls}; {describe(x)})")
    if mode == "bilinear":
        oh, ow = _pair("output_size", output_size) if output_size is not None else (-(-h // 2), -(-w // 2))
        return TokenPoolSpec(h, w, mode, 1, 1, 1, 1, oh, ow, has_cls, keep_cls, norm, float(eps))
    kh, kw = _pair("kernel_size", kernel_size)
    if mode == "merge":
        if h % kh or w % kw:
            raise ValueError(f"grid: (h, w) = ({h}, {w}) is not divisible by kernel_size {(kh, kw)} for mode='merge'")
        return TokenPoolSpec(h, w, mode, kh, kw, kh, kw, h // kh, w // kw, has_cls, keep_cls, norm, float(eps))
    sh, sw = _pair("stride", stride) if stride is not None else (kh, kw)
    if kh > h or kw > w:
        raise ValueError(f"kernel_size: window {(kh, kw)} is larger than the grid ({h}, {w})")
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    return TokenPoolSpec(h, w, mode, kh, kw, sh, sw, oh, ow, has_cls, keep_cls, norm, float(eps))


def _validate_norm_params(x: torch.Tensor, spec: TokenPoolSpec, weight, bias) -> None:
    width = spec.c_out(x.shape[-1])
    for name, t in (("norm_weight", weight), ("norm_bias", bias)):
        if t is None:
            continue
        if spec.norm is None:
            raise ValueError(f"{name}: given but norm is None (pass norm='layernorm' or 'rmsnorm')")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != width:
            raise ValueError(f"{name}: expected shape ({width},) (the output width), got {describe(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype, got {describe(t)}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} like x, got {describe(t)}")


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _triton_check(inp: Inputs) -> list:
    x, spec = inp["x"], inp["spec"]
    reasons = triton_reasons(x, nonempty=(x,))
    if spec.norm is not None and triton_device_reason(x) is None:  # (the kernel module imports triton)
        from ..kernels.token_pool import MAX_NORM_WIDTH

        width = spec.c_out(x.shape[-1])
        if width > MAX_NORM_WIDTH:
            reasons.append(f"a fused norm over {width} channels (at most {MAX_NORM_WIDTH})")
    return reasons


def _fused_run(impl: str):
    def run(x, spec, norm_weight, norm_bias):
        save = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, norm_weight, norm_bias))
        out, _ = _token_pool_fwd(x, norm_weight, norm_bias, impl, *_spec_args(spec), save)
        return out

    return run


# The CUDA module's availability is looked up once, outside any traced region's control:
# ``assume_constant_result`` lets torch.compile call it at trace time instead of tracing the
# import (which may fail: the module is optional).  A plain global caches it (no lru_cache).
_CUDA_STATE: list = []


@assume_constant_result
def _cuda_unavailable() -> str:
    if not _CUDA_STATE:
        try:
            reasons = [str(r) for r in _impl("cuda").available()]
        except ModuleNotFoundError as exc:
            if exc.name != "mmkernels.kernels.token_pool_cuda":
                raise
            reasons = ["mmkernels.kernels.token_pool_cuda is missing"]
        except ImportError as exc:  # present but broken
            reasons = [f"import mmkernels.kernels.token_pool_cuda failed: {exc}"]
        _CUDA_STATE.append("; ".join(reasons))
    return _CUDA_STATE[0]


def _cuda_available() -> list:
    why = _cuda_unavailable()
    return [Reason(why, expected=True)] if why else []


def _cuda_check(inp: Inputs) -> list:
    x, spec = inp["x"], inp["spec"]
    if x.device.type != "cuda":
        return [Reason("CPU tensors: the CUDA extension runs on CUDA tensors only", expected=True)]
    return kernel_reasons(x, nonempty=(x,)) or list(_impl("cuda").check(x, spec))


def _reference_run(x, spec, norm_weight, norm_bias):
    return ref.token_pool_spec(x, spec, norm_weight, norm_bias)


dispatch.register(dispatch.Backend("triton", "token_pool", _triton_check, _fused_run("triton"),
                                   description="fused Triton token pooling (fwd + gather bwd)"))
dispatch.register(dispatch.Backend("cuda", "token_pool", _cuda_check, _fused_run("cuda"), available=_cuda_available,
                                   description="fused CUDA C++ token pooling (csrc/token_pool.cu)"))
dispatch.register(dispatch.Backend("reference", "token_pool", lambda inp: [], _reference_run,
                                   description="plain PyTorch (mmkernels.reference.token_pool)"))


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def token_pool(
    x: torch.Tensor,
    *,
    grid=None,
    mode: str = "avg",
    kernel_size=2,
    stride=None,
    output_size=None,
    has_cls: bool = False,
    keep_cls: bool = False,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Shrink a grid of visual tokens in one pass: pool / interpolate / merge, then an optional norm.

    ``x``: (B, N, C) tokens, N = h·w (+1 with ``has_cls``: token 0 is a CLS token), cell (i, j)
    at token i·w + j (after the CLS); any strides.  ``grid`` = (h, w), inferred when the grid is
    square.  Output (B, keep_cls + h'·w', C_out), contiguous, x's dtype:

    ===========  =========================================  ======================  =========
    ``mode``     equals (on the (B, C, h, w) view)          (h', w')                C_out
    ===========  =========================================  ======================  =========
    "avg"        ``F.avg_pool2d(img, k, s)``                ⌊(h−kh)/sh⌋+1, …        C
    "max"        ``F.max_pool2d(img, k, s)``                ⌊(h−kh)/sh⌋+1, …        C
    "bilinear"   ``F.interpolate(img, output_size,          output_size, default    C
                 mode="bilinear", align_corners=False)``    (⌈h/2⌉, ⌈w/2⌉)
    "merge"      space-to-depth by k (stride = k)           h/kh, w/kw              kh·kw·C
    ===========  =========================================  ======================  =========

    ``kernel_size`` / ``stride`` (default: kernel_size): int or (kh, kw); no padding, floor
    mode.  ``merge`` orders channels (di, dj, c), i.e.
    ``x.view(B, h/s, s, w/s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, s*s*C)`` — InternVL's
    ``pixel_shuffle(0.5)`` and Idefics3's ``pixel_shuffle(2)``.  A 27×27 grid pooled by 2×2::

        avg/max (k=2):        27×27 → 13×13 (the last row/column is dropped, as in F.avg_pool2d)
        bilinear (default):   27×27 → 14×14 (LLaVA-OneVision)
        merge (k=2):          needs h, w divisible by 2 — 27×27 raises ValueError

    ``norm``: None, "layernorm" or "rmsnorm" over the C_out channels of every output row, fused
    (fp32 statistics, one rounding): layernorm = ``F.layer_norm(y, (C_out,), norm_weight,
    norm_bias, eps)``; rmsnorm = ``y * rsqrt(mean(y²) + eps) * norm_weight (+ norm_bias)``.
    Gemma 3's RMSNorm multiplies by (1 + w) in fp32: pass ``norm_weight=1 + w.float()``
    (:class:`mmkernels.nn.Gemma3MultiModalProjector` does).  ``norm_weight`` / ``norm_bias``:
    shape (C_out,), any floating dtype, gradients computed.

    CLS: ``has_cls`` drops token 0 before pooling; ``keep_cls`` puts it back in front as output
    row 0, unpooled, and normed like every other row (the norm is per output row; not available
    with ``merge``, whose rows are wider than the CLS token).

    ``backend``: None (auto / ``MMKERNELS_BACKEND`` / ``mmkernels.use_backend``), "triton",
    "cuda" or "reference".  Fused paths: float16, bfloat16, float32 (computed in fp32); float64
    goes to the reference.

    Equivalent PyTorch (mode="avg", has_cls=True, keep_cls=True, norm="layernorm")::

        cls, t = x[:, :1], x[:, 1:]
        y = F.avg_pool2d(t.reshape(B, h, w, C).permute(0, 3, 1, 2), k, s).flatten(2).transpose(1, 2)
        y = F.layer_norm(torch.cat([cls, y], 1), (C,), norm_weight, norm_bias, eps)
    """
    spec = make_spec(x, grid=grid, mode=mode, kernel_size=kernel_size, stride=stride, output_size=output_size,
                     has_cls=has_cls, keep_cls=keep_cls, norm=norm, eps=eps)
    _validate_norm_params(x, spec, norm_weight, norm_bias)
    inputs = Inputs(x=x, spec=spec, norm_weight=norm_weight, norm_bias=norm_bias)
    chosen = dispatch.select("token_pool", inputs, backend)
    return chosen.run(**inputs)
