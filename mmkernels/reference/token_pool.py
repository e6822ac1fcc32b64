"""Plain-PyTorch visual-token pooling: the eager chains VLMs run today (ground truth in tests,
baseline in benchmarks).

Works in any floating dtype, float64 included, on any device.  Each mode is written as the
models write it — a view of the (B, N, C) tokens as a (B, C, h, w) image, then
``F.avg_pool2d`` / ``F.max_pool2d`` / ``F.interpolate`` and back, or the view/permute/reshape of
a pixel shuffle — so "equal to the reference" means "equal to the model".  Norms compute in
float32 for float16/bfloat16 inputs and round once, as ``F.layer_norm`` does internally and as
Gemma 3's / Qwen2's RMSNorm do explicitly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["layer_norm", "merge", "pool_grid", "rms_norm", "token_pool", "token_pool_spec"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pool_grid(tokens: torch.Tensor, h: int, w: int, mode: str, kernel_size=2, stride=None,
              output_size=None) -> torch.Tensor:
    """(B, h·w, C) grid tokens → (B, h'·w', C) by ``avg`` / ``max`` / ``bilinear``.

    Equivalent to the models' chain: view as (B, C, h, w) → pool → flatten → transpose.
    """
    b, _, c = tokens.shape
    img = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
    if mode == "avg":
        out = F.avg_pool2d(img, kernel_size, stride if stride is not None else kernel_size)
    elif mode == "max":
        out = F.max_pool2d(img, kernel_size, stride if stride is not None else kernel_size)
    elif mode == "bilinear":
        size = _pair(output_size) if output_size is not None else (math.ceil(h / 2), math.ceil(w / 2))
        out = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"mode: expected 'avg', 'max' or 'bilinear' here, got {mode!r}")
    return out.flatten(2).transpose(1, 2)


def merge(tokens: torch.Tensor, h: int, w: int, kernel_size=2) -> torch.Tensor:
    """Space-to-depth: (B, h·w, C) → (B, (h/s)·(w/s), s·s·C), channel order (di, dj, c).

    Equals InternVL's ``pixel_shuffle(x, 0.5)`` and Idefics3's ``pixel_shuffle(x, 2)``.
    """
    b, _, c = tokens.shape
    kh, kw = _pair(kernel_size)
    x = tokens.reshape(b, h // kh, kh, w // kw, kw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // kh) * (w // kw), kh * kw * c)


def _upcast(y: torch.Tensor) -> torch.Tensor:
    return y.float() if y.dtype in (torch.float16, torch.bfloat16) else y


def layer_norm(y, weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim, computed in float32 (float64 for float64), rounded once."""
    yf = _upcast(y)
    cast = (lambda t: None if t is None else t.to(yf.dtype))
    return F.layer_norm(yf, (y.shape[-1],), cast(weight), cast(bias), eps).to(y.dtype)


def rms_norm(y, weight=None, bias=None, eps: float = 1e-6) -> torch.Tensor:
    """x·rsqrt(mean(x²) + eps)·weight (+ bias), computed in float32 (float64), rounded once.

    Gemma 3's ``(1 + weight)`` form is this with ``weight = 1 + w.float()``.
    """
    yf = _upcast(y)
    out = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(yf.dtype)
    if bias is not None:
        out = out + bias.to(yf.dtype)
    return out.to(y.dtype)


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
) -> torch.Tensor:
    """Reference of :func:`mmkernels.token_pool` (same arguments, no validation beyond shapes).

    x (B, N, C), N = h·w (+1 with ``has_cls``) → (B, keep_cls + h'·w', C_out).
    """
    cls, tokens = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
    if grid is None:
        side = math.isqrt(tokens.shape[1])
        grid = (side, side)
    h, w = _pair(grid)
    if mode == "merge":
        y = merge(tokens, h, w, kernel_size)
    else:
        y = pool_grid(tokens, h, w, mode, kernel_size, stride, output_size)
    if keep_cls:
        y = torch.cat([cls, y], dim=1)
    if norm == "layernorm":
        y = layer_norm(y, norm_weight, norm_bias, eps)
    elif norm == "rmsnorm":
        y = rms_norm(y, norm_weight, norm_bias, eps)
    elif norm is not None:
        raise ValueError(f"norm: expected None, 'layernorm' or 'rmsnorm', got {norm!r}")
    return y


def token_pool_spec(x: torch.Tensor, spec, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`token_pool` for a validated ``mmkernels.kernels.token_pool.TokenPoolSpec`` (the
    ``reference`` backend; read by attribute, so the ground truth imports nothing from the
    production code)."""
    return token_pool(
        x, grid=(spec.h, spec.w), mode=spec.mode, kernel_size=(spec.kh, spec.kw), stride=(spec.sh, spec.sw),
        output_size=(spec.oh, spec.ow) if spec.mode == "bilinear" else None, has_cls=spec.has_cls,
        keep_cls=spec.keep_cls, norm=spec.norm, norm_weight=weight, norm_bias=bias, eps=spec.eps,
    )
