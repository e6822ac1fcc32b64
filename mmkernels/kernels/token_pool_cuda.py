"""Fused visual-token pooling in CUDA C++ (``csrc/token_pool.cu``): the Python side.

The ``cuda`` backend of :func:`mmkernels.token_pool` — the same ``forward`` / ``backward`` pair as
the Triton launcher (:mod:`mmkernels.kernels.token_pool`), so ``ops/token_pool.py`` serves both
with one ``torch.library`` op.  This module allocates every output (so ``MMKERNELS_POISON=1``
and the saved-tensor layout stay in Python) and calls the extension's launch primitives
``torch.ops.mmkernels_cuda.token_pool_fwd`` / ``token_pool_bwd`` (``csrc/token_pool.cpp``), which
write in place.

What the kernels do (details in ``csrc/token_pool.cu``): the forward runs one CUDA block per
output row, reading the window / taps / merged cells straight from the (B, N, C) token layout
with 16-byte loads along C (8 fp16/bf16 or 4 fp32 channels) when the channel stride is 1 and
rows are 16-byte aligned — else one channel at a time, any strides — accumulating in fp32 and
applying the LayerNorm/RMSNorm from the row kept in shared memory.  The backward is a gather
(no atomics): each input row sums the gradients of the outputs that read it; with a norm, a
first kernel turns grad_out into d(pooled) from the saved pre-norm rows and statistics and sums
dweight/dbias per block (reduced in a fixed order: deterministic).

Importing this module touches no GPU, builds nothing and never raises; :func:`available` loads
the extension (``mmkernels._ext``: the ``setup.py`` build, or a JIT build with
``MMKERNELS_JIT_BUILD=1``) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .._utils import new_output, poisoning

if TYPE_CHECKING:  # the spec's module imports triton; this backend must work without it
    from .token_pool import TokenPoolSpec

__all__ = ["available", "backward", "check", "forward", "geometry", "saved_like"]

# codes shared with csrc/token_pool.h (enum Mode, enum Norm)
MODE_CODE = {"avg": 0, "max": 1, "bilinear": 2, "merge": 3}
NORM_CODE = {None: 0, "layernorm": 1, "rmsnorm": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# csrc/token_pool.h: kMaxNormChannels (the fused norm's row lives in shared memory as fp32:
# 4·C_out bytes forward, 12·C_out backward, under an A100 block's 163 KiB), kMaxBilinearRatio
# (the bilinear gather keeps at most 32 taps per axis)
MAX_NORM_CHANNELS = 12288
MAX_BILINEAR_RATIO = 8
MAX_WINDOW = 32767  # max-pool argmax offsets are int16


def _ops():
    """``torch.ops.mmkernels_cuda`` after loading the extension (None when it cannot load)."""
    from .. import _ext

    if _ext.load() is None:
        return None
    return torch.ops.mmkernels_cuda


def available() -> list[str]:
    """Why this backend cannot run at all here ([] when it can): the extension is not built,
    does not import, lacks the token-pool ops (a stale build), or there is no CUDA device."""
    try:
        from .. import _ext

        why = _ext.unavailable_reason()
        if why:
            return [f"CUDA extension mmkernels._C: {why}"]
        ops = _ops()
        if ops is None or not hasattr(ops, "token_pool_fwd") or not hasattr(ops, "token_pool_bwd"):
            return ["CUDA extension mmkernels._C has no mmkernels_cuda::token_pool_fwd/bwd "
                    "(built before csrc/token_pool.cu existed? rebuild it)"]
    except Exception as exc:  # never raise: a broken install is a reason, not a crash
        return [f"CUDA extension mmkernels._C: {type(exc).__name__}: {exc}"]
    return []


def check(x: torch.Tensor, spec: "TokenPoolSpec") -> list[str]:
    """Why this call cannot run on the CUDA kernels ([] when it can)."""
    reasons: list[str] = []
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return [f"x must be a (B, N, C) tensor, got {getattr(x, 'shape', type(x).__name__)}"]
    if x.device.type != "cuda":
        reasons.append(f"x is on {x.device}: the CUDA kernels take CUDA tensors")
    if x.dtype not in DTYPES:
        reasons.append(f"dtype {x.dtype} (the CUDA kernels take float32, float16, bfloat16)")
    if spec.mode not in MODE_CODE:
        reasons.append(f"mode {spec.mode!r} (the CUDA kernels know {', '.join(MODE_CODE)})")
    if spec.norm not in NORM_CODE:
        reasons.append(f"norm {spec.norm!r} (the CUDA kernels know layernorm, rmsnorm)")
    b, n, c = x.shape
    if n != spec.n_in:
        reasons.append(f"x has {n} tokens, the spec expects h*w + has_cls = {spec.n_in}")
    if spec.mode == "max" and spec.kh * spec.kw > MAX_WINDOW:
        reasons.append(f"a {spec.kh}x{spec.kw} max window (int16 argmax: at most {MAX_WINDOW} cells)")
    if spec.norm is not None and spec.c_out(c) > MAX_NORM_CHANNELS:
        reasons.append(f"a fused norm over {spec.c_out(c)} channels (the CUDA kernels: at most {MAX_NORM_CHANNELS})")
    if spec.mode == "bilinear" and (spec.oh > MAX_BILINEAR_RATIO * spec.h or spec.ow > MAX_BILINEAR_RATIO * spec.w):
        reasons.append(f"bilinear upsampling {spec.h}x{spec.w} -> {spec.oh}x{spec.ow} "
                       f"(the CUDA backward gathers at most {MAX_BILINEAR_RATIO}x)")
    if b * max(spec.n_out, spec.n_in) >= 2**31:
        reasons.append(f"{b * max(spec.n_out, spec.n_in)} rows (one CUDA block each: at most 2**31 - 1)")
    return reasons


def geometry(spec: "TokenPoolSpec") -> list[int]:
    """The ``geom`` list of the extension's ops: [h, w, mode, kh, kw, sh, sw, oh, ow, has_cls,
    keep_cls, norm] with the codes of ``csrc/token_pool.h``."""
    return [spec.h, spec.w, MODE_CODE[spec.mode], spec.kh, spec.kw, spec.sh, spec.sw, spec.oh, spec.ow,
            int(spec.has_cls), int(spec.keep_cls), NORM_CODE[spec.norm]]


def saves_y(spec: "TokenPoolSpec") -> bool:
    """With a norm the forward saves the pre-norm rows, except for merge (the backward re-reads
    x, a permutation of them: the same bytes)."""
    return spec.norm is not None and spec.mode != "merge"


def saved_like(x: torch.Tensor, spec: "TokenPoolSpec") -> list[torch.Tensor]:
    """Empty tensors shaped like what :func:`forward` saves (the op's fake kernel uses this).

    In this order, each only where it applies:

    * ``mode == "max"``: argmax (B, oh·ow, C) int16 — the row-major offset di·kw + dj of the
      winning element inside its window;
    * ``norm`` set and ``mode != "merge"``: the pre-norm rows y (B, n_out, C_out) in x's dtype;
    * ``norm`` set: stats (2, B, n_out) float32 — mean (0 for rmsnorm) and rstd of every output row.
    """
    b, _, c = x.shape
    saved = []
    if spec.mode == "max":
        saved.append(x.new_empty((b, spec.n_pooled, c), dtype=torch.int16))
    if saves_y(spec):
        saved.append(x.new_empty((b, spec.n_out, spec.c_out(c))))
    if spec.norm is not None:
        saved.append(x.new_empty((2, b, spec.n_out), dtype=torch.float32))
    return saved


def _none(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The empty tensor the ops take for an output that is not wanted."""
    return torch.empty((0,), dtype=dtype, device=x.device)


def _extension_ops():
    ops = _ops()
    if ops is None:
        raise RuntimeError("; ".join(available()) or "the CUDA extension mmkernels._C is not available")
    return ops


# The two launch primitives (module attributes, so tests/test_token_pool_cuda.py can route them
# to the host emulation of the kernels on machines without a GPU).
def _launch_fwd(x, geom, eps, weight, bias, out, argmax, y, stats) -> None:
    _extension_ops().token_pool_fwd(x, geom, eps, weight, bias, out, argmax, y, stats)


def _launch_bwd(grad_out, x, geom, weight, argmax, y, stats, dx, dweight, dbias) -> None:
    _extension_ops().token_pool_bwd(grad_out, x, geom, weight, argmax, y, stats, dx, dweight, dbias)


def forward(x: torch.Tensor, spec: "TokenPoolSpec", weight: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Launch the forward: (out (B, n_out, C_out) contiguous in x's dtype, saved tensors — layout
    in :func:`saved_like`).  weight / bias: (C_out,) any floating dtype (used in fp32), or None."""
    b, _, c = x.shape
    c_out = spec.c_out(c)
    out = new_output((b, spec.n_out, c_out), x.dtype, x.device)
    saved: list[torch.Tensor] = []
    argmax = y = stats = None
    if spec.mode == "max":
        argmax = torch.empty((b, spec.n_pooled, c), dtype=torch.int16, device=x.device)
        if poisoning():  # no window has offset -1: an index the kernel forgot routes no gradient
            argmax.fill_(-1)
        saved.append(argmax)
    if saves_y(spec):
        y = new_output((b, spec.n_out, c_out), x.dtype, x.device)
        saved.append(y)
    if spec.norm is not None:
        stats = new_output((2, b, spec.n_out), torch.float32, x.device)
        saved.append(stats)
    _launch_fwd(
        x, geometry(spec), float(spec.eps), weight, bias, out,
        argmax if argmax is not None else _none(x, torch.int16),
        y if y is not None else _none(x, x.dtype),
        stats if stats is not None else _none(x, torch.float32),
    )
    return out, saved


def backward(grad_out: torch.Tensor, x: torch.Tensor, spec: "TokenPoolSpec", weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], saved: list[torch.Tensor]
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward: (dx (B, N, C) contiguous in x's dtype, dweight, dbias) — the last two
    in weight's / bias's dtype, None when weight / bias are None.  ``grad_out``: any strides."""
    b, n, c = x.shape
    c_out = spec.c_out(c)
    rest = list(saved)
    argmax = rest.pop(0) if spec.mode == "max" else _none(x, torch.int16)
    y = rest.pop(0) if saves_y(spec) else _none(x, x.dtype)
    stats = rest.pop(0) if spec.norm is not None else _none(x, torch.float32)
    dx = new_output((b, n, c), x.dtype, x.device)
    want_w = weight is not None and spec.norm is not None
    want_b = bias is not None and spec.norm is not None
    dw = new_output((c_out,), torch.float32, x.device) if want_w else _none(x, torch.float32)
    db = new_output((c_out,), torch.float32, x.device) if want_b else _none(x, torch.float32)
    _launch_bwd(grad_out, x, geometry(spec), weight, argmax, y, stats, dx, dw, db)
    return (dx, dw.to(weight.dtype) if want_w else None, db.to(bias.dtype) if want_b else None)
