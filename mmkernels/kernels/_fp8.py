"""FP8 (e4m3) attention forward for inference: the pieces the shared forward body
(:func:`._attention_body._fwd_body`, constexpr ``FP8``) and the launchers use.

Operands.  Q, K, V are ``float8_e4m3fn`` with fp32 descales per (batch or sequence packing,
head): the value a kernel sees is ``x_fp8 · descale``.  The descales live in one small fp32
tensor ``DESC`` of shape (B·Hq, 3) (dense) or (Hq, 3) (packed): row ``stat_bh`` of the program
(the forward body's statistics row: dense batch·H + head, packed the head) holds
(q_descale, k_descale of its kv head, v_descale of its kv head).

In the loop (``_fwd_body``):
* S = Q8·K8ᵀ on fp8 tensor cores with fp32 accumulation; ``q_descale·k_descale`` is folded into
  the exp2 scale (:func:`_fp8_qk_scale`: one multiply per program, none per score);
* P (in [0, 1]) is multiplied by ``P_SCALE`` = 256 and rounded to e4m3 (:func:`_fp8_p`): a power
  of two, so the scaling is exact, and P down to 2⁻¹⁷ stays representable (e4m3's smallest
  subnormal is 2⁻⁹; unscaled, P < 2⁻¹⁰ would flush to 0).  Measured in a torch emulation (d=72,
  L=256): P scaled by 1, 256 or 448 and row sums from fp32 or quantised P change the max error by
  < 1 %: the error is Q/K quantisation's.  The row sum l is accumulated from the fp32 P;
* O += P8·V8 (fp32 accumulation); the epilogue multiplies by ``v_descale / (P_SCALE · l)``
  (:func:`_fp8_finish`).

V stays row-major (as Q and K): fp8 wgmma reads its B operand K-major, and Triton transposes the
V tile on the way to shared memory (sm_90 compiles: both products ``wgmma … e4m3.e4m3``).  Measured
against a sequence-contiguous V (stored transposed, loaded with a key-direction 16-byte hint) on
sm_90, siglip d=72 128×128: the transposed layout saved ~70 instructions per interior iteration
(698 vs 770) but its ragged last key tile loaded V one byte at a time (48 scalar loads at L=729),
it needed a transposed copy of a float8 V given row-major, and in the packed layout a sequence's
V starts at any byte (no 16-byte hint possible); row-major V has 16-byte rows (pre-pass copies
padded to 16 bytes), no scalar loads, fewer registers (243 vs 255 causal) and 61 vs 84 KB of
shared memory.  Head-dim chunks are at least 32 wide (fp8 ``tl.dot`` needs K >= 32: :func:`split_head_dim_fp8`;
72 → 64 + 32, the padding columns read as zeros in registers).

Dynamic quantisation (``fp8="dynamic"``): two launches of one pre-pass kernel per operand
(:func:`quantize_dynamic`): pass 1 the per-(batch, head) amax (``tl.atomic_max`` of row-block
maxima into a zeroed fp32 buffer), pass 2 the e4m3 copies scaled so that amax maps to 448 (e4m3's
largest finite value) — with rotary (Q and K) the rotation is computed in fp32 in both passes and
quantised directly (no rounded rotated copy in between).  Memory: one byte per element of Q, K, V
(the copies, rows padded to 16 bytes) plus (B·H) fp32 amax values per operand: O(L·d).  Packed
inputs are quantised per head over the whole packing (descales (H,)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rotary import _rotated_tile
from ._tiles import _load_rows, rotary_args

P_SCALE = tl.constexpr(256.0)
E4M3_MAX = 448.0


# --------------------------------------------------------------------------------------
# jit helpers of the forward body
# --------------------------------------------------------------------------------------
@triton.jit
def _fp8_qk_scale(DESC, row, qk_scale):
    """The exp2 scale of raw fp8 products: qk_scale · q_descale · k_descale."""
    d = DESC + row.to(tl.int64) * 3
    return qk_scale * (tl.load(d) * tl.load(d + 1))


@triton.jit
def _fp8_p(p):
    """P (fp32, in [0, 1]) scaled by P_SCALE for its e4m3 rounding (the caller's ``.to``)."""
    return p * P_SCALE


@triton.jit
def _fp8_finish(DESC, row, inv_l):
    """The epilogue factor: 1/l · v_descale / P_SCALE."""
    return inv_l * (tl.load(DESC + row.to(tl.int64) * 3 + 2) / P_SCALE)


# --------------------------------------------------------------------------------------
# the dynamic quantisation pre-pass
# --------------------------------------------------------------------------------------
@triton.jit
def _fp8_quant(
    X, Y, AMAX, COS, SIN, H, L,
    sxb, sxh, sxl, sxd, syb, syh, syl, syd, scb, scl, scd,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY: tl.constexpr, BLOCK_L: tl.constexpr,
    WRITE: tl.constexpr,
):
    """Rows [pid·BLOCK_L, +BLOCK_L) of X (B, H, L, D) (any strides), rotated first when ROTARY
    (``_rotary._rotated_tile``, fp32).  WRITE=False: atomic max of |x| into AMAX[b·H + h];
    WRITE=True: x·448/amax rounded to e4m3 into Y (last stride 1)."""
    pid_l = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < L
    offs_d = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    base = X + b * sxb + h * sxh
    if ROTARY > 0:
        rr = b * scb + rows[:, None].to(tl.int64) * scl
        x = _rotated_tile(base, rows, row_ok, sxl, sxd, COS, SIN, rr, scd, HEAD_DIM, BLOCK_D, ROTARY, False)
    else:
        x = _load_rows(base, rows.to(tl.int64), row_ok, sxl, offs_d, sxd, HEAD_DIM, False).to(tl.float32)
    if WRITE:
        amax = tl.load(AMAX + pid_bh)
        inv = tl.where(amax > 0.0, 448.0 / amax, 1.0)
        y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        ptrs = Y + b * syb + h * syh + rows[:, None].to(tl.int64) * syl + offs_d[None, :] * syd
        tl.store(ptrs, y.to(Y.dtype.element_ty), mask=ok)
    else:
        tl.atomic_max(AMAX + pid_bh, tl.max(tl.max(tl.abs(x), 1), 0))


def _round16(n: int) -> int:
    return (n + 15) // 16 * 16


def fp8_copy(shape4, device):
    """(storage, view) of an e4m3 copy of a (B, H, L, D) operand, rows padded to 16 bytes (the
    kernels' 16-byte row hint, ``ALIGNED``)."""
    b, h, length, d = shape4
    store = torch.empty((b, h, length, _round16(d)), dtype=torch.float8_e4m3fn, device=device)
    return store, store[..., :d]


def quantize_dynamic(x4, cos=None, sin=None):
    """(e4m3 view (B, H, L, D), descales (B·H,) fp32) of ``x4`` (B, H, L, D) (any strides, optionally
    rotated by cos/sin first): two launches of :func:`_fp8_quant`.  Device ops only."""
    b, h, length, d = x4.shape
    _, y = fp8_copy(x4.shape, x4.device)
    amax = torch.zeros(b * h, dtype=torch.float32, device=x4.device)
    if x4.numel() == 0:
        return y, amax
    cos_t, sin_t, kind, cstr = rotary_args(cos, sin, x4)
    block_l = 32
    grid = (triton.cdiv(length, block_l), b * h)
    args = (x4, y, amax, cos_t, sin_t, h, length, *x4.stride(), *y.stride(), *cstr)
    meta = dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ROTARY=kind, BLOCK_L=block_l)
    _fp8_quant[grid](*args, **meta, WRITE=False)
    _fp8_quant[grid](*args, **meta, WRITE=True)
    return y, amax / E4M3_MAX


# --------------------------------------------------------------------------------------
# host helpers of the launchers
# --------------------------------------------------------------------------------------
def split_head_dim_fp8(d: int) -> tuple[int, int]:
    """``split_head_dim`` with chunks of at least 32 (fp8 dots contract over K >= 32):
    64 → (64, 0), 72/80/88 → (64, 32), 128 → (128, 0), 136 → (128, 32), d <= 32 → (32, 0)."""
    from ._tiles import split_head_dim

    d0, d1 = split_head_dim(d)
    d0 = max(d0, 32)
    if d1:
        d1 = max(d1, 32)
        full = max(32, triton.next_power_of_2(d))
        if d0 + d1 >= full:
            return full, 0
    return d0, d1


def aligned_bytes(*tensors: torch.Tensor) -> bool:
    """The kernels' ALIGNED hint for 1-byte (B, H, L, D) operands: unit head-dim stride, every
    other stride a multiple of 16 elements (= bytes) and the base 16-byte aligned."""
    return all(t.stride(-1) == 1 and all(st % 16 == 0 for st in t.stride()[:-1]) and t.data_ptr() % 16 == 0
               for t in tensors)
