"""The vision rotary embedding (rotate-half RoPE of Qwen2-VL's ``apply_rotary_pos_emb_vision``)
for the attention kernels: applied once to Q and K before the attention loops
(:func:`rotated_copies`: one O(L·d) pass each, into a rotated copy the loops read as plain operands), and
rotated back out of the finished dQ/dK after the backward (:func:`unrotate_grad`, in place).

Rotating inside the loops instead re-rotated every key tile for every query block (and every
query tile for every key block in dK/dV), with fp32 cos/sin streamed per tile: measured on sm_90
(compiled, triton 3.6/3.9) 2.7-3.1x the instructions per score of the plain loops at d=72/80,
tiles halved, 10-12 scalar partner loads per iteration at d=72/88, and 120 B of spills in the
d=128 dK/dV default.  The pre-pass costs a read and a write of Q and K, and one rotated copy of each (in their
dtype) as temporary memory; the backward recomputes the copies rather than keeping them.

rotate_half pairs column c with c ± D/2.  ROTARY (constexpr): 1 cos/sin hold D columns; 2 they
hold D/2 (HF's ``cat((f, f))`` stored once: column c reads c mod D/2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tiles import _load_rows, rotary_args


@triton.jit
def _cos_cols(offs_d, HEAD_DIM: tl.constexpr, ROTARY: tl.constexpr):
    """The cos/sin column holding each head-dim column's frequency."""
    HALF: tl.constexpr = HEAD_DIM // 2
    cc = offs_d
    if ROTARY == 2:
        cc = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
    return cc


@triton.jit
def _rotated_tile(base, rows, row_ok, sxl, sxd, COS, SIN, rr, scd,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr, INVERSE: tl.constexpr):
    """The fp32 [rows, BLOCK_D] tile of a (L, D) matrix at ``base`` (any strides), rotated.
    Forward: y[c] = x[c]·cos[c] ∓ x[c']·sin[c] (rotate_half: − for c < D/2, c' the partner
    column).  INVERSE (the gradient of that map): y[c] = x[c]·cos[c] ± x[c']·sin[c'].  cos/sin
    rows at ``rr`` (a [rows, 1] offset).  Out-of-range entries are 0."""
    HALF: tl.constexpr = HEAD_DIM // 2
    offs_d = tl.arange(0, BLOCK_D)
    lo = offs_d < HALF
    partner = tl.where(lo, offs_d + HALF, offs_d - HALF)
    rows64 = rows.to(tl.int64)  # row offsets in 64 bits: a packed tensor's row stride is H·D
    x = _load_rows(base, rows64, row_ok, sxl, offs_d, sxd, HEAD_DIM, False).to(tl.float32)
    xp = _load_rows(base, rows64, row_ok, sxl, partner, sxd, HEAD_DIM, False).to(tl.float32)
    cmask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    c = tl.load(COS + rr + _cos_cols(offs_d, HEAD_DIM, ROTARY)[None, :] * scd, mask=cmask, other=0.0)
    if INVERSE:
        s = tl.load(SIN + rr + _cos_cols(partner, HEAD_DIM, ROTARY)[None, :] * scd, mask=cmask, other=0.0)
        y = x * c.to(tl.float32) + tl.where(lo[None, :], xp, -xp) * s.to(tl.float32)
    else:
        s = tl.load(SIN + rr + _cos_cols(offs_d, HEAD_DIM, ROTARY)[None, :] * scd, mask=cmask, other=0.0)
        y = x * c.to(tl.float32) + tl.where(lo[None, :], -xp, xp) * s.to(tl.float32)
    return y


@triton.jit
def _rotate_rows(
    X, Y, COS, SIN, H, L, sxb, sxh, sxl, sxd, syb, syh, syl, scb, scl, scd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr, BLOCK_L: tl.constexpr,
    INVERSE: tl.constexpr,
):
    """BLOCK_L rows of X (B, H, L, D) (any strides) rotated (:func:`_rotated_tile`) into Y (last
    stride 1), in fp32, rounded to Y's dtype.  A program owns whole rows, so Y may be X (in
    place): a row's partner columns are read before it is written.  cos/sin rows
    ``b·scb + row·scl``.  Grid (cdiv(L, BLOCK_L), B·H)."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < L
    offs_d = tl.arange(0, BLOCK_D)
    rr = b * scb + rows[:, None].to(tl.int64) * scl
    y = _rotated_tile(X + b * sxb + h * sxh, rows, row_ok, sxl, sxd, COS, SIN, rr, scd, HEAD_DIM, BLOCK_D, ROTARY,
                      INVERSE)
    ptrs = Y + b * syb + h * syh + rows[:, None].to(tl.int64) * syl + offs_d[None, :]
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


# Two entry points of the one body, so that ``inspect`` names each pass.
@triton.jit
def _rotary_rotate(
    X, Y, COS, SIN, H, L, sxb, sxh, sxl, sxd, syb, syh, syl, scb, scl, scd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """Q or K rotated into a copy before the attention loops (HF's ``apply_rotary_pos_emb_vision``)."""
    _rotate_rows(X, Y, COS, SIN, H, L, sxb, sxh, sxl, sxd, syb, syh, syl, scb, scl, scd,
                 HEAD_DIM, BLOCK_D, ROTARY, BLOCK_L, False)


@triton.jit
def _rotary_unrotate(
    X, Y, COS, SIN, H, L, sxb, sxh, sxl, sxd, syb, syh, syl, scb, scl, scd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """dQ or dK of the rotated operand rotated back to the un-rotated input's gradient, in place."""
    _rotate_rows(X, Y, COS, SIN, H, L, sxb, sxh, sxl, sxd, syb, syh, syl, scb, scl, scd,
                 HEAD_DIM, BLOCK_D, ROTARY, BLOCK_L, True)


def _launch(kernel, x, y, cos, sin, cs_strides, rotary_kind: int) -> None:
    b, h, length, d = x.shape
    if x.numel() == 0:
        return
    block_l = 32
    kernel[(triton.cdiv(length, block_l), b * h)](
        x, y, cos, sin, h, length, *x.stride(), y.stride(0), y.stride(1), y.stride(2), *cs_strides,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ROTARY=rotary_kind, BLOCK_L=block_l,
    )


def rotated_copies(query, key, cos, sin, view=lambda t: t):
    """(q_rot, k_rot, rotation): Q and K rotated once into contiguous copies that the attention
    loops read as plain operands, and ``rotation`` = (cos, sin, strides, kind) for
    :func:`unrotate_grad`.  ``view`` maps a tensor to its (B, H, L, D) view (the packed
    (total, H, D) layout: ``(1, H, total, D)``, the packed row being the rotary row)."""
    cos, sin, kind, cstr = rotary_args(cos, sin, query)
    q_rot = torch.empty_like(query, memory_format=torch.contiguous_format)
    k_rot = torch.empty_like(key, memory_format=torch.contiguous_format)
    _launch(_rotary_rotate, view(query), view(q_rot), cos, sin, cstr, kind)
    _launch(_rotary_rotate, view(key), view(k_rot), cos, sin, cstr, kind)
    return q_rot, k_rot, (cos, sin, cstr, kind)


def unrotate_grad(x, cos, sin, cs_strides, rotary_kind: int) -> None:
    """Rotate the gradient ``x`` (viewed as (B, H, L, D), last stride 1) of a rotated q or k
    back, in place; ``cs_strides`` = (batch, row, col) strides of cos/sin (batch 0: shared)."""
    _launch(_rotary_unrotate, x, x, cos, sin, cs_strides, rotary_kind)
