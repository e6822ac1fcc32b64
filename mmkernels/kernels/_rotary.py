"""The vision rotary embedding (rotate-half RoPE of Qwen2-VL's ``apply_rotary_pos_emb_vision``)
as jit helpers for the attention kernels: applied to a Q/K tile while it is loaded, and rotated
back out of the gradients after the backward.

rotate_half pairs column c with c ± D/2.  The partner columns are read with a second load rather
than shuffled in registers, which keeps the power-of-two head-dim split of the attention kernels
(80 → 64+16) valid where a half-split layout would pad 80 to 128.  The backward cannot undo the
rotation in registers (its dQ/dK accumulators hold the split chunks, and a column's partner may
be in the other chunk), so :func:`_rotary_unrotate` runs once over the finished gradients.

ROTARY (constexpr): 0 none; 1 cos/sin hold D columns; 2 they hold D/2 (HF's ``cat((f, f))``
stored once: column c reads c mod D/2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._tiles import _load_cols2, _load_rows


@triton.jit
def _cos_cols(offs_d, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr):
    """The cos/sin column holding each head-dim column's frequency."""
    HALF: tl.constexpr = HEAD_DIM // 2
    cc = offs_d
    if ROTARY == 2:
        cc = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
    return cc


@triton.jit
def _load_rot(base, rows, row_ok, stride_r, stride_d, offs_d, COS, SIN, cs_base, scl, scd,
              HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr, ALIGNED: tl.constexpr):
    """Tile [rows, offs_d] of a (L, D) matrix, rotated when ROTARY: x·cos + rotate_half(x)·sin
    in fp32, rounded to x's dtype (what HF does before its attention call).  cos/sin rows are
    ``COS + cs_base + row·scl``.  Out-of-range entries read 0."""
    x = _load_rows(base, rows, row_ok, stride_r, offs_d, stride_d, HEAD_DIM, ALIGNED)
    if ROTARY != 0:
        HALF: tl.constexpr = HEAD_DIM // 2
        lo = offs_d < HALF
        partner = tl.where(lo, offs_d + HALF, offs_d - HALF)
        # the partner columns wrap around D/2 inside a chunk: not one contiguous run, no hint
        xp = _load_rows(base, rows, row_ok, stride_r, partner, stride_d, HEAD_DIM, False).to(tl.float32)
        cmask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        coffs = cs_base + rows[:, None].to(tl.int64) * scl + _cos_cols(offs_d, HEAD_DIM, ROTARY)[None, :] * scd
        c = tl.load(COS + coffs, mask=cmask, other=0.0).to(tl.float32)
        s = tl.load(SIN + coffs, mask=cmask, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) * c + tl.where(lo[None, :], -xp, xp) * s).to(x.dtype)
    return x


@triton.jit
def _load_rot2(base, rows, row_ok, stride_r, stride_d, COS, SIN, cs_base, scl, scd,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ROTARY: tl.constexpr,
               ALIGNED: tl.constexpr):
    """The two head-dim chunks [rows, D0], [rows, D1] of :func:`_load_rot` (D1 = 0: the
    second is the first again, unused)."""
    t0 = _load_rot(base, rows, row_ok, stride_r, stride_d, tl.arange(0, D0), COS, SIN, cs_base, scl, scd,
                   HEAD_DIM, ROTARY, ALIGNED)
    t1 = t0
    if D1 > 0:
        t1 = _load_rot(base, rows, row_ok, stride_r, stride_d, D0 + tl.arange(0, D1), COS, SIN, cs_base, scl,
                       scd, HEAD_DIM, ROTARY, ALIGNED)
    return t0, t1


@triton.jit
def _load_keys_T(base, cols, col_ok, stride_c, stride_d, COS, SIN, cs_base, scl, scd,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, ROTARY: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """Transposed key chunks [D0, cols], [D1, cols]; with ROTARY the rows are rotated as they are
    loaded (see :mod:`mmkernels.kernels._rotary`), then transposed."""
    if ROTARY != 0:
        k0, k1 = _load_rot2(base, cols, col_ok, stride_c, stride_d, COS, SIN, cs_base, scl, scd,
                            HEAD_DIM, D0, D1, ROTARY, ALIGNED)
        kT0 = tl.trans(k0)
        kT1 = kT0
        if D1 > 0:
            kT1 = tl.trans(k1)
    else:
        kT0, kT1 = _load_cols2(base, cols, col_ok, stride_c, stride_d, HEAD_DIM, D0, D1, ALIGNED)
    return kT0, kT1


@triton.jit
def _rotary_unrotate(
    X, COS, SIN, H, L, sxb, sxh, sxl, scb, scl, scd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """In place on a gradient X (B, H, L, D) (any strides, last = 1) of rotated q or k:
    dx = dy·cos − rotate_half(dy·sin), i.e. dx[c] = dy[c]·cos[c] ± dy[c']·sin[c'] with c' the
    rotate_half partner (+ for c < D/2).  A program owns whole rows, so reading a row's partner
    columns before writing it back is race-free.  Grid (cdiv(L, BLOCK_L), B·H)."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < L
    offs_d = tl.arange(0, BLOCK_D)
    lo = offs_d < HALF
    partner = tl.where(lo, offs_d + HALF, offs_d - HALF)
    base = X + b * sxb + h * sxh
    dy = _load_rows(base, rows, row_ok, sxl, offs_d, 1, HEAD_DIM, False).to(tl.float32)
    dyp = _load_rows(base, rows, row_ok, sxl, partner, 1, HEAD_DIM, False).to(tl.float32)
    cmask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rr = b * scb + rows[:, None].to(tl.int64) * scl
    c = tl.load(COS + rr + _cos_cols(offs_d, HEAD_DIM, ROTARY)[None, :] * scd, mask=cmask, other=0.0)
    sp = tl.load(SIN + rr + _cos_cols(partner, HEAD_DIM, ROTARY)[None, :] * scd, mask=cmask, other=0.0)
    c = c.to(tl.float32)
    sp = sp.to(tl.float32)
    dx = dy * c + tl.where(lo[None, :], dyp * sp, -dyp * sp)
    ptrs = base + rows[:, None] * sxl + offs_d[None, :]
    tl.store(ptrs, dx.to(X.dtype.element_ty), mask=cmask)


def unrotate_grad(x, cos, sin, cs_strides, rotary_kind: int) -> None:
    """Launch :func:`_rotary_unrotate` in place on ``x`` viewed as (B, H, L, D) (last stride 1);
    ``cs_strides`` = (batch, row, col) strides of cos/sin (batch 0: shared)."""
    b, h, length, d = x.shape
    if x.numel() == 0:
        return
    block_l = 32
    _rotary_unrotate[(triton.cdiv(length, block_l), b * h)](
        x, cos, sin, h, length, x.stride(0), x.stride(1), x.stride(2), *cs_strides,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ROTARY=rotary_kind, BLOCK_L=block_l,
    )
