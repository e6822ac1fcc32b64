"""Fused visual-token pooling in Triton: avg / max / bilinear / merge (+ LayerNorm / RMSNorm).

Layout: x is (B, N, C) tokens with any strides, token 1·has_cls + i·w + j holding grid cell
(i, j).  Nothing is permuted or copied: every program computes its addresses in that layout.

Forward (``_token_pool_fwd``), one pass: a program owns BLOCK_R output rows × BLOCK_C output
channels of one sample, reads the window / taps / merged cells of each straight from x,
reduces in fp32 and writes each output element once.  With a norm, BLOCK_C covers the whole
output row (≤ 16384 channels), so the row statistics are taken from registers and the norm is
applied before the single store.  ``max`` also stores the argmax (the offset inside the
window, int16); a norm over pooled rows also stores the pre-norm rows y (x's dtype, 1/4 to
1/16 of x) so the backward does not re-read x.

Backward, as gathers (no atomics):

* with a norm, ``_token_pool_norm_bwd`` (persistent, one row block at a time) turns grad_out
  into dy = ∂L/∂y (fp32) and accumulates per-program partial sums for dweight / dbias (summed
  by torch afterwards).  For ``merge`` the rows are recomputed from x (a permutation: as cheap
  as reading a saved copy) and dy is written straight into dx, which finishes the backward.
* ``_token_pool_bwd``: a program owns BLOCK_T input tokens × BLOCK_C channels and sums the
  gradients of every output that read them: the ⌈k/s⌉² windows covering a cell (avg; max where
  the saved argmax points at the cell), the bilinear taps whose source index lands on the cell
  (recomputed with the forward's exact arithmetic), or the one merged channel.  The CLS token
  receives output row 0's gradient (keep_cls) or 0.

Bilinear arithmetic follows ATen's ``upsample_bilinear2d`` (align_corners=False, size given):
scale = in/out in fp32, src = max(scale·(dst + 0.5) − 0.5, 0), i0 = min(⌊src⌋, in − 1),
λ1 = clamp(src − i0, 0, 1), i1 = i0 + (i0 < in − 1).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

# The spec is defined triton-free (mmkernels/_token_pool_spec.py) so the op and the CUDA backend
# work where triton is absent; it is re-exported here, where the kernels that read it live.
from .._token_pool_spec import MODES, NORMS, TokenPoolSpec
from .._utils import new_output, poisoning
from ._launch import for_gpu, sm_count

__all__ = ["MAX_NORM_WIDTH", "MODES", "NORMS", "TokenPoolSpec", "backward", "forward", "saved_like"]

# A fused norm keeps a whole output row in registers: 16384 channels covers every model we
# know (InternViT-6B merged: 4·3200 = 12800); wider rows go to another backend.
MAX_NORM_WIDTH = 16384


def saved_like(x: torch.Tensor, spec: TokenPoolSpec) -> list[torch.Tensor]:
    """Empty tensors shaped like what :func:`forward` saves for :func:`backward` (the op's fake
    kernel calls this; the CUDA backend has its own ``saved_like``, whose layout adds row statistics).

    Layout, in this order:

    * ``mode == "max"``: argmax (B, oh·ow, C) of :meth:`TokenPoolSpec.index_dtype` — the
      row-major offset di·kw + dj of the winning element inside its window;
    * ``norm`` set and ``mode != "merge"``: the pre-norm rows y (B, n_out, C_out) in x's dtype
      (1/4 to 1/16 of x for pooling; merge recomputes its rows from x, a permutation).
    """
    b, _, c = x.shape
    saved = []
    if spec.mode == "max":
        saved.append(x.new_empty((b, spec.n_pooled, c), dtype=spec.index_dtype()))
    if spec.norm is not None and spec.mode != "merge":
        saved.append(x.new_empty((b, spec.n_out, spec.c_out(c))))
    return saved


_MODE_ID = {"avg": 0, "max": 1, "bilinear": 2, "merge": 3}
_NORM_ID = {None: 0, "layernorm": 1, "rmsnorm": 2}


# --------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _bilinear_src(o, scale, IN):
    """ATen's (i0, i1, λ0, λ1) for output index o (align_corners=False)."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), IN - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + (i0 < IN - 1).to(tl.int32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _merge_offsets(p, cc, W, OW, C, KH: tl.constexpr, KW: tl.constexpr, HAS_CLS: tl.constexpr):
    """(token, channel) [R, BC] read by merged output channel cc of pooled row p."""
    oi = p // OW
    oj = p - oi * OW
    q = cc // C
    c = cc - q * C
    di = q // KW
    dj = q - di * KW
    tok = HAS_CLS + (oi[:, None] * KH + di[None, :]) * W + oj[:, None] * KW + dj[None, :]
    return tok, c[None, :]


@triton.jit
def _pooled_rows(
    X, b, rows, row_ok, cc, c_ok, sxb, sxn, sxc, H, W, OW, C, scale_h, scale_w,
    MODE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_CLS: tl.constexpr, KEEP_CLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """fp32 tile [BLOCK_R, BLOCK_C] of output rows (row 0 = CLS with KEEP_CLS) before the norm,
    and for MODE max the int32 window offset of each maximum."""
    base = X + b * sxb
    p = tl.maximum(rows - KEEP_CLS, 0)
    pooled_ok = row_ok & (rows >= KEEP_CLS)
    m = pooled_ok[:, None] & c_ok[None, :]
    oi = p // OW
    oj = p - oi * OW
    arg = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)
    if MODE == 0:  # avg: F.avg_pool2d sums the window in fp32, then divides
        acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        for di in range(KH):
            for dj in range(KW):
                tok = HAS_CLS + (oi * SH + di) * W + oj * SW + dj
                acc += tl.load(base + tok[:, None] * sxn + cc[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
        acc = acc / (KH * KW)
    elif MODE == 1:  # max: first maximum in row-major order; NaN wins (ATen's `val > max || isnan(val)`)
        acc = tl.full([BLOCK_R, BLOCK_C], float("-inf"), dtype=tl.float32)
        for di in range(KH):
            for dj in range(KW):
                tok = HAS_CLS + (oi * SH + di) * W + oj * SW + dj
                v = tl.load(base + tok[:, None] * sxn + cc[None, :] * sxc, mask=m, other=0.0).to(tl.float32)
                take = (v > acc) | (v != v)
                acc = tl.where(take, v, acc)
                arg = tl.where(take, di * KW + dj, arg)
    elif MODE == 2:  # bilinear
        i0, i1, lh0, lh1 = _bilinear_src(oi, scale_h, H)
        j0, j1, lw0, lw1 = _bilinear_src(oj, scale_w, W)
        r0 = HAS_CLS + i0 * W
        r1 = HAS_CLS + i1 * W
        cofs = cc[None, :] * sxc
        x00 = tl.load(base + (r0 + j0)[:, None] * sxn + cofs, mask=m, other=0.0).to(tl.float32)
        x01 = tl.load(base + (r0 + j1)[:, None] * sxn + cofs, mask=m, other=0.0).to(tl.float32)
        x10 = tl.load(base + (r1 + j0)[:, None] * sxn + cofs, mask=m, other=0.0).to(tl.float32)
        x11 = tl.load(base + (r1 + j1)[:, None] * sxn + cofs, mask=m, other=0.0).to(tl.float32)
        top = lw0[:, None] * x00 + lw1[:, None] * x01
        bot = lw0[:, None] * x10 + lw1[:, None] * x11
        acc = lh0[:, None] * top + lh1[:, None] * bot
    else:  # merge: output channel (di·KW + dj)·C + c of pooled row (oi, oj)
        tok, c = _merge_offsets(p, cc, W, OW, C, KH, KW, HAS_CLS)
        acc = tl.load(base + tok * sxn + c * sxc, mask=m, other=0.0).to(tl.float32)
    if KEEP_CLS:
        cls_rows = row_ok & (rows == 0)
        cls = tl.load(base + cc[None, :] * sxc + rows[:, None] * 0, mask=cls_rows[:, None] & c_ok[None, :], other=0.0)
        acc = tl.where(cls_rows[:, None], cls.to(tl.float32), acc)
    return acc, arg


@triton.jit
def _row_stats(y, c_ok, C_OUT, eps, NORM: tl.constexpr):
    """(xhat, rstd) of each row of y over its C_OUT valid channels (columns past C_OUT give 0)."""
    if NORM == 1:
        mean = tl.sum(y, 1) / C_OUT
        d = tl.where(c_ok[None, :], y - mean[:, None], 0.0)
        var = tl.sum(d * d, 1) / C_OUT
        rstd = 1.0 / tl.sqrt(var + eps)
        xhat = d * rstd[:, None]
    else:
        rstd = 1.0 / tl.sqrt(tl.sum(y * y, 1) / C_OUT + eps)
        xhat = tl.where(c_ok[None, :], y * rstd[:, None], 0.0)
    return xhat, rstd


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit
def _token_pool_fwd(
    X, NW, NB, OUT, IDX, Y,
    sxb, sxn, sxc,
    H, W, OW, C, C_OUT, N_OUT, N_POOL, scale_h, scale_w, eps,
    MODE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_CLS: tl.constexpr, KEEP_CLS: tl.constexpr,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE_IDX: tl.constexpr, SAVE_Y: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N_OUT
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C_OUT
    m = row_ok[:, None] & c_ok[None, :]
    y, arg = _pooled_rows(X, b, rows, row_ok, cc, c_ok, sxb, sxn, sxc, H, W, OW, C, scale_h, scale_w,
                          MODE, KH, KW, SH, SW, HAS_CLS, KEEP_CLS, BLOCK_R, BLOCK_C)
    out_offs = b * N_OUT * C_OUT + rows[:, None] * C_OUT + cc[None, :]
    if SAVE_IDX:
        p = rows - KEEP_CLS
        tl.store(IDX + b * N_POOL * C + p[:, None] * C + cc[None, :], arg.to(IDX.dtype.element_ty),
                 mask=m & (p >= 0)[:, None])
    if NORM != 0:
        if SAVE_Y:
            tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=m)
        y = tl.where(c_ok[None, :], y, 0.0)
        y, _ = _row_stats(y, c_ok, C_OUT, eps, NORM)
        if HAS_WEIGHT:
            y = y * tl.load(NW + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(NB + cc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(OUT + out_offs, y.to(OUT.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit
def _token_pool_norm_bwd(
    G, X, Y, NW, DY, DX, DW_PART, DB_PART,
    sgb, sgn, sgc, sxb, sxn, sxc,
    H, W, OW, C, C_OUT, N_OUT, N_IN, NUM_RB, TOTAL_RB, eps,
    MODE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_CLS: tl.constexpr,
    NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, RECOMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dy = ∂L/∂(pre-norm row) and partial dweight / dbias; RECOMPUTE (merge): rows from x and
    dy stored straight into dx (contiguous (B, N_IN, C))."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cc = tl.arange(0, BLOCK_C)
    c_ok = cc < C_OUT
    if HAS_WEIGHT:
        wt = tl.load(NW + cc, mask=c_ok, other=0.0).to(tl.float32)
    else:
        wt = tl.where(c_ok, 1.0, 0.0)
    dw_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for rb in range(pid, TOTAL_RB, nprog):
        b = (rb // NUM_RB).to(tl.int64)
        rows = (rb % NUM_RB) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N_OUT
        m = row_ok[:, None] & c_ok[None, :]
        if RECOMPUTE:
            y, _ = _pooled_rows(X, b, rows, row_ok, cc, c_ok, sxb, sxn, sxc, H, W, OW, C, 1.0, 1.0,
                                MODE, KH, KW, KH, KW, HAS_CLS, False, BLOCK_R, BLOCK_C)
        else:
            y = tl.load(Y + b * N_OUT * C_OUT + rows[:, None] * C_OUT + cc[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + b * sgb + rows[:, None] * sgn + cc[None, :] * sgc, mask=m, other=0.0).to(tl.float32)
        xhat, rstd = _row_stats(y, c_ok, C_OUT, eps, NORM)
        wg = g * wt[None, :]
        c2 = tl.sum(wg * xhat, 1) / C_OUT
        if NORM == 1:
            c1 = tl.sum(wg, 1) / C_OUT
            dy = (wg - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        else:
            dy = (wg - xhat * c2[:, None]) * rstd[:, None]
        dw_acc += tl.sum(g * xhat, 0)
        db_acc += tl.sum(g, 0)
        if RECOMPUTE:
            tok, c = _merge_offsets(rows, cc, W, OW, C, KH, KW, HAS_CLS)
            tl.store(DX + b * N_IN * C + tok * C + c, dy.to(DX.dtype.element_ty), mask=m)
        else:
            tl.store(DY + b * N_OUT * C_OUT + rows[:, None] * C_OUT + cc[None, :], dy, mask=m)
    tl.store(DW_PART + pid * C_OUT + cc, dw_acc, mask=c_ok)
    tl.store(DB_PART + pid * C_OUT + cc, db_acc, mask=c_ok)


@triton.jit
def _token_pool_bwd(
    G, IDX, DX,
    sgb, sgn, sgc,
    N, H, W, OH, OW, C, scale_h, scale_w,
    MODE: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    NTH: tl.constexpr, NTW: tl.constexpr, HAS_CLS: tl.constexpr, KEEP_CLS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx for BLOCK_T input tokens × BLOCK_C channels, gathered from the outputs that read them
    (G: grad of the pre-norm rows, (B, KEEP_CLS + OH·OW, C_OUT) with strides)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cc < C
    gi = tl.maximum(t - HAS_CLS, 0)
    i = gi // W
    j = gi - i * W
    grid_ok = t_ok & (t >= HAS_CLS)
    g_base = G + b * sgb
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    if MODE <= 1:  # avg / max: the windows (oi, oj) with oi·SH <= i < oi·SH + KH
        for a in range(NTH):
            oi = i // SH - a
            di = i - oi * SH
            vi = (oi >= 0) & (oi < OH) & (di < KH)
            for e in range(NTW):
                oj = j // SW - e
                dj = j - oj * SW
                ok = grid_ok & vi & (oj >= 0) & (oj < OW) & (dj < KW)
                p = oi * OW + oj
                mk = ok[:, None] & c_ok[None, :]
                g = tl.load(g_base + (KEEP_CLS + p)[:, None] * sgn + cc[None, :] * sgc, mask=mk, other=0.0)
                if MODE == 0:
                    acc += g.to(tl.float32)
                else:
                    win = tl.load(IDX + (b * OH * OW + p)[:, None] * C + cc[None, :], mask=mk, other=-1)
                    acc += tl.where(win.to(tl.int32) == (di * KW + dj)[:, None], g.to(tl.float32), 0.0)
        if MODE == 0:
            acc = acc / (KH * KW)
    elif MODE == 2:  # bilinear: candidate outputs around i/scale; exact taps recomputed as in the forward
        oi_lo = tl.ceil((i.to(tl.float32) - 0.5) / scale_h - 0.5).to(tl.int32) - 1
        oj_lo = tl.ceil((j.to(tl.float32) - 0.5) / scale_w - 0.5).to(tl.int32) - 1
        for a in range(NTH):
            oi = oi_lo + a
            i0, i1, lh0, lh1 = _bilinear_src(oi, scale_h, H)
            wh = tl.where(i0 == i, lh0, 0.0) + tl.where(i1 == i, lh1, 0.0)
            wh = tl.where((oi >= 0) & (oi < OH), wh, 0.0)
            for e in range(NTW):
                oj = oj_lo + e
                j0, j1, lw0, lw1 = _bilinear_src(oj, scale_w, W)
                ww = tl.where(j0 == j, lw0, 0.0) + tl.where(j1 == j, lw1, 0.0)
                ww = tl.where((oj >= 0) & (oj < OW), ww, 0.0)
                wgt = wh * ww
                ok = grid_ok & (wgt != 0.0)
                p = oi * OW + oj
                g = tl.load(g_base + (KEEP_CLS + p)[:, None] * sgn + cc[None, :] * sgc,
                            mask=ok[:, None] & c_ok[None, :], other=0.0)
                acc += wgt[:, None] * g.to(tl.float32)
    else:  # merge: one output element per input element
        oi = i // KH
        oj = j // KW
        q = (i - oi * KH) * KW + (j - oj * KW)
        p = oi * OW + oj
        g = tl.load(g_base + p[:, None] * sgn + (q[:, None] * C + cc[None, :]) * sgc,
                    mask=grid_ok[:, None] & c_ok[None, :], other=0.0)
        acc = g.to(tl.float32)
    if KEEP_CLS:
        is_cls = t_ok & (t == 0)
        g = tl.load(g_base + t[:, None] * 0 + cc[None, :] * sgc, mask=is_cls[:, None] & c_ok[None, :], other=0.0)
        acc = tl.where(is_cls[:, None], g.to(tl.float32), acc)
    tl.store(DX + (b * N + t)[:, None] * C + cc[None, :], acc.to(DX.dtype.element_ty),
             mask=t_ok[:, None] & c_ok[None, :])


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def _scale(n_in: int, n_out: int) -> float:
    """ATen's in/out ratio, divided in fp32 as ``area_pixel_compute_scale<float>`` does."""
    return float(np.float32(n_in) / np.float32(n_out))


def _bilinear_span(scale: float) -> int:
    """Candidate outputs per input index i in the bilinear gather.

    Output o reads i when its source index lies in [i − 1, i + 1), i.e. o in [L, L + 2/scale)
    with L = (i − 0.5)/scale − 0.5: at most ⌈2/scale⌉ of them from ⌈L⌉ (clamped sources near 0
    only add zero weights).  The gather starts at ⌈L⌉ − 1 and takes one spare on each side,
    so a rounding error in L cannot drop a tap (27 → 14: 4 candidates per axis)."""
    return int(np.ceil(2.0 / scale)) + 2


def _meta(spec: TokenPoolSpec) -> dict:
    return dict(MODE=_MODE_ID[spec.mode], KH=spec.kh, KW=spec.kw, HAS_CLS=bool(spec.has_cls))


def _warps(block_elems: int) -> int:
    return 4 if block_elems <= 2048 else (8 if block_elems <= 8192 else 16)


def _tiles(interp: bool, width: int, whole_row: bool, per_program: int = 4096) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): rows × channels per program.

    Not tuned on a GPU yet (none was available): ~2-4K elements per program; without a norm
    the channel block is the power of two in 128..512 that pads the row least (1152 → 128 × 9,
    not 512 × 3 = 1536).  The interpreter runs each program in Python: it gets larger tiles.
    """
    full = triton.next_power_of_2(max(width, 1))
    if whole_row or interp:
        block_c = full
    else:
        block_c = min(full, min((512, 256, 128), key=lambda bc: (triton.cdiv(width, bc) * bc, -bc)))
    budget = 16384 if interp else per_program
    return max(1, min(256 if interp else 64, budget // block_c)), block_c


def forward(x: torch.Tensor, spec: TokenPoolSpec, weight: Optional[torch.Tensor] = None,
            bias: Optional[torch.Tensor] = None, *, save: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Launch the forward; returns the output (B, n_out, C_out) contiguous and the saved
    tensors (layout in :func:`saved_like`; none with ``save=False``, for inference)."""
    b, _, c = x.shape
    c_out = spec.c_out(c)
    interp = not for_gpu(x.device.type)
    has_norm = spec.norm is not None
    out = new_output((b, spec.n_out, c_out), x.dtype, x.device)
    saved = []
    idx = y = x
    if save and spec.mode == "max":
        idx = torch.empty((b, spec.n_pooled, c), dtype=spec.index_dtype(), device=x.device)
        if poisoning():  # -1 is no window's offset: an index the kernel forgot routes no gradient
            idx.fill_(-1)
        saved.append(idx)
    save_y = save and has_norm and spec.mode != "merge"
    if save_y:
        y = new_output((b, spec.n_out, c_out), x.dtype, x.device)
        saved.append(y)
    block_r, block_c = _tiles(interp, c_out, has_norm)
    grid = (triton.cdiv(spec.n_out, block_r), b, triton.cdiv(c_out, block_c))
    _token_pool_fwd[grid](
        x, weight if weight is not None else x, bias if bias is not None else x, out, idx, y,
        *x.stride(),
        spec.h, spec.w, spec.ow, c, c_out, spec.n_out, spec.n_pooled,
        _scale(spec.h, spec.oh), _scale(spec.w, spec.ow), float(spec.eps),
        **_meta(spec), SH=spec.sh, SW=spec.sw, KEEP_CLS=bool(spec.keep_cls),
        NORM=_NORM_ID[spec.norm], HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        SAVE_IDX=save and spec.mode == "max", SAVE_Y=save_y,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(block_r * block_c),
    )
    return out, saved


def _norm_programs(x: torch.Tensor, total: int) -> int:
    """Persistent programs of the norm backward: each writes one (C_out,) partial of dweight
    and dbias, so 2 per SM keeps that traffic small (132 SMs, C_out 4608: 4.9 MB) next to the
    gradients it reads."""
    if not for_gpu(x.device.type):
        return min(total, 4)
    return min(total, 2 * sm_count(x.device))


def backward(grad_out: torch.Tensor, x: torch.Tensor, spec: TokenPoolSpec, weight: Optional[torch.Tensor],
             bias: Optional[torch.Tensor], saved: list[torch.Tensor]
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward; returns (dx contiguous like x, dweight, dbias) — the last two None
    when weight / bias are None."""
    b, n, c = x.shape
    c_out = spec.c_out(c)
    interp = not for_gpu(x.device.type)
    saved = list(saved)
    idx = saved.pop(0) if spec.mode == "max" else x
    dx = new_output((b, n, c), x.dtype, x.device)
    dw = db = None
    g, g_strides = grad_out, grad_out.stride()
    if spec.norm is not None:
        recompute = spec.mode == "merge"
        y = x if recompute else saved.pop(0)
        block_r, block_c = _tiles(interp, c_out, True)
        num_rb = triton.cdiv(spec.n_out, block_r)
        nprog = _norm_programs(x, b * num_rb)
        parts = torch.empty((2, nprog, c_out), dtype=torch.float32, device=x.device)
        dy = x if recompute else torch.empty((b, spec.n_out, c_out), dtype=torch.float32, device=x.device)
        _token_pool_norm_bwd[(nprog,)](
            grad_out, x, y, weight if weight is not None else x, dy, dx, parts[0], parts[1],
            *grad_out.stride(), *x.stride(),
            spec.h, spec.w, spec.ow, c, c_out, spec.n_out, n, num_rb, b * num_rb, float(spec.eps),
            **_meta(spec), NORM=_NORM_ID[spec.norm], HAS_WEIGHT=weight is not None, RECOMPUTE=recompute,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_warps(block_r * block_c),
        )
        if weight is not None:
            dw = parts[0].sum(0).to(weight.dtype)
        if bias is not None:
            db = parts[1].sum(0).to(bias.dtype)
        if recompute:
            if spec.has_cls:
                dx[:, 0].zero_()  # the dropped CLS token
            return dx, dw, db
        g, g_strides = dy, dy.stride()
    block_t, block_c = _tiles(interp, c, False, per_program=2048)
    if spec.mode == "bilinear":
        sh, sw = _scale(spec.h, spec.oh), _scale(spec.w, spec.ow)
        nth, ntw = _bilinear_span(sh), _bilinear_span(sw)
    else:
        sh = sw = 1.0
        nth, ntw = triton.cdiv(spec.kh, spec.sh), triton.cdiv(spec.kw, spec.sw)
    grid = (triton.cdiv(n, block_t), b, triton.cdiv(c, block_c))
    _token_pool_bwd[grid](
        g, idx, dx, *g_strides,
        n, spec.h, spec.w, spec.oh, spec.ow, c, sh, sw,
        **_meta(spec), SH=spec.sh, SW=spec.sw, NTH=nth, NTW=ntw, KEEP_CLS=bool(spec.keep_cls),
        BLOCK_T=block_t, BLOCK_C=block_c, num_warps=_warps(block_t * block_c),
    )
    return dx, dw, db
