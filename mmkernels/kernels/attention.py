"""Fused flash attention (FlashAttention-2 style) in Triton: forward, backward, launchers.

Layout (B, H, L, D) with arbitrary strides.  One forward program owns BLOCK_M query rows of
one (batch, head) and streams the keys in BLOCK_N tiles with an online softmax; it stores O
and the row's log-sum-exp (as base-2 max and log2 sum) — the backward recomputes P from
them, so the saved state is O(L) (Q, K, V, O, LSE; no P, no dropout mask).

The forward, dK/dV and dQ bodies are written once, in :mod:`._attention_body`, and shared with
the packed kernels (:mod:`.attention_varlen`): the kernels here are their dense prologues
(program id → batch, head, row block; batch b is sequence b, its rows at b·stride_b), calling
the bodies with ``VARLEN=False`` (top-left causal; masks, mask gradients and TMA enabled).

Backward, without atomics:
* ``_attn_bwd_preprocess``: delta = rowsum(dO * O) (fp32);
* ``_attn_bwd_dkdv``: one program per (key block, batch, kv head) loops over the query heads
  of its group (GQA) and the query blocks, accumulating dK and dV in registers; it works on
  transposed tiles (Sᵀ = K Qᵀ, [BLOCK_N, BLOCK_M]) so that every product has BLOCK_N >= 64
  rows — the shape Hopper's wgmma needs — even with 32-row query blocks;
* ``_attn_bwd_dq``: one program per (query block, batch, head) loops over the key blocks.

Mask work only where it is needed: each key loop runs in two phases, the interior blocks (fully
inside the key length and, causal, fully left of the diagonal) with no bounds or causal select,
then the edge blocks (the causal diagonal band and the ragged last block) with them; a user mask
applies on every block.  The softmax scale is folded into the max-subtract: p = exp2(s·scale −
m) is one FMA per score (``_online_softmax``), except with additive masks or a scale <= 0
(PRESCALE: the logits are scaled first).

Head dims that are not a power of two (72, 80, 88 in SigLIP, Qwen2-VL, EVA ViT-g) are split
into two power-of-two chunks D0 + D1 (72 → 64+16, 80 → 64+16, 88 → 64+32) rather than
padded to the next power of two (128): every QKᵀ and PV product is two dots, so d=88 costs
96 columns of work instead of 128.

Masks: bool (True = attend) or additive float, passed with the strides of their broadcast
view (stride 0 along broadcast dims), never materialised.  A mask that only masks keys — a
(B, 1, 1, Lk) padding mask, CLIP / EVA / BLIP-2 / SigLIP with padded batches — is read once
per key, not per score (MASK_KIND 3 bool / 4 additive): ``_tiles.key_spans`` finds per batch
row, on the device, the keys to visit (up to the last kept one: the padding tiles are never
loaded) and the leading run of keys kept without bias, whose tiles run as interior tiles (no
mask work at all); the tiles between read one mask value per key.  General masks are read per
score (MASK_KIND 1 / 2).  Causal masking is top-left aligned (query i sees key j <= i) as in
SDPA.  Rows with no visible key get LSE = +inf, O = 0 and zero gradients.

NaN (the rule of ``mk.attention``'s docstring, "NaN and Inf" in docs/design.md): what reaches a
row through the tiles it computes propagates as in SDPA's math (a NaN or +inf additive mask entry
gives a NaN logit — the finfo.min clamp keeps NaN; 0·NaN in P·V); what a row cannot reach here —
keys above the causal band it skips, logits a select hides (causal triangle, bool mask) — the op
layer adds from reductions over Q, K, V and the mask (``ops.attention._math_nans``).  Not in the
kernel: seeding a bool-masked row's sum with its query's NaN (for a row whose keys are all
hidden) cost the sm_90 bf16 forward up to 9 registers (d=72 mask + dropout: 243 → 252).

Dropout: Philox keyed by a seed drawn from torch's generator plus the (batch·head) index; one
call (``tl.randint4x``, 4 words) per 4 consecutive keys of a row, counter = row·ceil(Lk/4) +
key/4 (``_tiles._dropout_keep``); the backward regenerates the same mask.  (The stream changed
with this: the same seed drops other positions than before; per seed it is reproducible.)

Rotary (``cos``/``sin`` given): Q and K are rotated once, before the loops, into contiguous copies
(Qwen2-VL's vision RoPE, :func:`mmkernels.kernels._rotary.rotated_copies`, recomputed in the backward), so
the loops, their tiles, candidates and TMA are exactly the plain ones; the backward rotates dQ and
dK back in a final pass.

TMA (sm_90): the autotuner's candidates include tensor-descriptor versions of the main loops
(``USE_TMA=True`` in the config; the streamed tiles — forward and dQ: K and V, dK/dV: Q and dO —
copied by TMA with ``cp.async.bulk.tensor`` instead of per-thread ``cp.async``; helpers in
:mod:`._tma`).  They are offered on sm_90 and newer (``_tma.tma_target``) for fp16/bf16 at
d <= 128 (``_tma_offered``), only when the streamed operands meet TMA's preconditions
(``_tma.tma_ok``: 16-byte aligned base, unit last stride, other strides multiples of 16 bytes;
otherwise the list has no TMA config), and after the pointer-load candidates, so the untuned
default (``MMKERNELS_AUTOTUNE=0``) keeps the pointer loads and the autotuner picks per shape.
With rotary they apply to the rotated copies (contiguous: TMA-compatible when D is a
multiple of 8).  Compiled for sm_90 under triton 3.6 and 3.9 (``mmkernels inspect --tma-only``): TMA
copies and wgmma, registers and spills as their pointer twins.  The launcher installs Triton's
scratch allocator for the device-side descriptors when none is set.

Interpreter note: ``tl.dot`` on bf16 operands is wrong in the Triton interpreter (measured:
max error ~5e10 on a 16×32·32×16 product), so under TRITON_INTERPRET bf16 tiles are upcast
to fp32 right before each dot (UPCAST).  Products of bf16 values are exact in fp32, so this
matches the GPU's bf16 MMA with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import interpreting, new_output
from ._attention_body import _dkdv_body, _dq_body, _fwd_body
from ._launch import for_gpu, gpu_launcher
from ._rotary import rotated_copies, unrotate_grad
from ._tiles import (
    _aligned,
    _dot_precision,
    _load_rows,
    _mask_args,
    key_spans,
    split_head_dim,
)
from ._tma import ensure_allocator, tma_ok, tma_target


# --------------------------------------------------------------------------------------
# forward (the body: ``_attention_body._fwd_body``, shared with the packed kernels)
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, MASK, KSPAN, SEED,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    smb, smh, smm, smn,
    H, LQ, LK, GROUP, LK_BUCKET,
    qk_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr = False,
    DESC=None, FP8: tl.constexpr = False,
):
    """Program (query block, batch·head): rows [pid_m·BLOCK_M, +BLOCK_M) of batch b, head h
    (``_attention_body._fwd_body``: batch b is sequence b, its rows at b·sqb).  FP8: the e4m3
    forward (:mod:`._fp8`, launched by :mod:`.attention_fp8`)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    _fwd_body(Q, K, V, O, LSE, MASK, KSPAN, SEED, b, b, h, hk, pid_bh, rows, rows, row_ok, pid_m * BLOCK_M, LQ, LK, LQ,
              pid_bh,
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smh, smm, smn,
              qk_scale, dropout_p, HEAD_DIM, D0, D1, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, PREC, UPCAST, ALIGNED,
              PRESCALE, BLOCK_M, BLOCK_N, USE_TMA, False, DESC, FP8)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    sob, soh, som, sod,
    sdb, sdh, sdm, sdd,
    H, LQ,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * sob + h * soh, rows, row_ok, som, offs_d, sod, HEAD_DIM, ALIGNED).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, rows, row_ok, sdm, offs_d, sdd, HEAD_DIM, ALIGNED).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + rows, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KSPAN, SEED,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    smb, smh, smm, smn,
    H, HKV, LQ, LK, GROUP, LK_BUCKET,
    qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr = False,
):
    """Program (key block, batch·kv head): dK, dV of keys [pid_n·BLOCK_N, +BLOCK_N) on
    transposed tiles (``_attention_body._dkdv_body``); dK/dV written contiguous (B, Hkv, LK, D)."""
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    b = (pid_bhk // HKV).to(tl.int64)
    hk = (pid_bhk % HKV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    _dkdv_body(Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KSPAN, SEED, b, b, b, hk, pid_bhk, cols, col_ok, pid_n * BLOCK_N,
               LQ, LK, H, HKV, GROUP, LQ,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd, smb, smh, smm, smn,
               qk_scale, sm_scale, dropout_p, HEAD_DIM, D0, D1, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, PREC, UPCAST,
               ALIGNED, PRESCALE, BLOCK_M, BLOCK_N, USE_TMA, False)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, KSPAN, SEED, DS,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    smb, smh, smm, smn,
    H, LQ, LK, GROUP, LK_BUCKET,
    qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_GRAD: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    """Program (query block, batch·head): dQ of rows [pid_m·BLOCK_M, +BLOCK_M)
    (``_attention_body._dq_body``), written contiguous (B, H, LQ, D)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    bh = pid_bh.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    _dq_body(Q, K, V, DO, LSE, DELTA, DQ, MASK, KSPAN, SEED, DS, b, b, h, hk, bh, rows, rows, row_ok, pid_m * BLOCK_M,
             LQ, LK, H, LQ,
             sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd, smb, smh, smm, smn,
             qk_scale, sm_scale, dropout_p, HEAD_DIM, D0, D1, MASK_KIND, IS_CAUSAL, HAS_DROPOUT, PREC, UPCAST,
             ALIGNED, PRESCALE, BLOCK_M, BLOCK_N, MASK_GRAD, USE_TMA, False)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def _common(query, key, attn_mask, dropout_p, is_causal, scale, seed, split=True, key_only=True):
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    # split=False pads the head dim to the next power of two: the benchmark's measure of the split's gain
    d0, d1 = split_head_dim(d) if split else (max(16, triton.next_power_of_2(d)), 0)
    # a key-only (padding) mask: read per key on edge tiles, its spans bound the key loops
    # (MASK_KIND 3/4); not with the mask gradient, whose dS covers every (query, key)
    mask, mask_kind, mstr = _mask_args(attn_mask, b, h, lq, lk, query, key_only=key_only)
    kspan = key_spans(mask) if mask_kind >= 3 else query
    has_dropout = dropout_p > 0.0
    if has_dropout and seed is None:
        raise ValueError("seed: dropout_p > 0 needs a seed tensor")
    meta = dict(
        HEAD_DIM=d, D0=d0, D1=d1, MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal),
        HAS_DROPOUT=has_dropout, PREC=_dot_precision(query.dtype),
        UPCAST=interpreting() and query.dtype == torch.bfloat16,
        # the scale is folded into the exp2's FMA (``_online_softmax``) unless an additive mask
        # must be added to the scaled logits first, or a scale <= 0 would flip the row max (a
        # key-only additive mask is divided by the scale instead, once per key: ``_key_mask``)
        PRESCALE=mask_kind == 2 or not float(scale) > 0.0,
    )
    seed_arg = seed if has_dropout else query
    return b, h, hkv, lq, lk, mask, kspan, mstr, seed_arg, meta


def _lk_bucket(lk: int) -> int:
    """Autotuning key for the key length: short (Q-Former, <= 256), medium (<= 1024), long."""
    return 256 if lk <= 256 else (1024 if lk <= 1024 else 4096)


def attention_forward(query, key, value, attn_mask, seed, dropout_p, is_causal, scale, cos=None, sin=None,
                      split=True):
    """Launch the forward; returns O (B, H, Lq, D) contiguous and the softmax statistics
    (B, H, 2, Lq) fp32: [..., 0, :] the row max and [..., 1, :] log2 of the row sum, both of the
    base-2 logits, so log-sum-exp = (max + log2 sum)·ln 2 (+inf for rows with no visible key)."""
    if cos is not None:
        query, key, _ = rotated_copies(query, key, cos, sin)
    b, h, hkv, lq, lk, mask, kspan, mstr, seed_arg, meta = _common(query, key, attn_mask, dropout_p, is_causal,
                                                                   scale, seed, split)
    meta["ALIGNED"] = _aligned(query, key, value)
    out = new_output((b, h, lq, value.shape[-1]), query.dtype, query.device)
    lse = new_output((b, h, 2, lq), torch.float32, query.device)
    kernel, cfg = _launcher("fwd", query.device.type, meta["HEAD_DIM"], query.dtype, meta["HAS_DROPOUT"], meta["PREC"],
                            tma=tma_target(query.device) and tma_ok(key, value), has_mask=meta["MASK_KIND"] in (1, 2),
                            lq=lq)
    grid = lambda META: (triton.cdiv(lq, META["BLOCK_M"]), b * h)  # noqa: E731
    kernel[grid](
        query, key, value, out, lse, mask, kspan, seed_arg,
        *query.stride(), *key.stride(), *value.stride(), *out.stride(), *mstr,
        h, lq, lk, h // hkv, _lk_bucket(lk),
        float(scale) * 1.4426950408889634, float(dropout_p),
        **meta, **cfg,
    )
    return out, lse


def attention_backward(grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale,
                       mask_grad=False, cos=None, sin=None, split=True):
    """Launch the three backward kernels; returns (dQ, dK, dV) shaped like the inputs, and with
    ``mask_grad`` (a float ``attn_mask``) also d(attn_mask) shaped like the mask — dS summed over
    the dims the mask broadcasts along (its full (B, H, Lq, Lk) fp32 is written once: O(L²)
    memory, as the mask's own gradient can be).  With rotary (cos/sin) dQ and dK are the
    gradients of the un-rotated query and key, rotated back in a final pass."""
    rotation = None
    if cos is not None:
        query, key, rotation = rotated_copies(query, key, cos, sin)
    b, h, hkv, lq, lk, mask, kspan, mstr, seed_arg, meta = _common(query, key, attn_mask, dropout_p, is_causal,
                                                                   scale, seed, split, key_only=not mask_grad)
    d = meta["HEAD_DIM"]
    meta["ALIGNED"] = _aligned(query, key, value, grad_out)
    delta = new_output((b, h, lq), torch.float32, query.device)
    pre_m = 64
    _attn_bwd_preprocess[(triton.cdiv(lq, pre_m), b * h)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), h, lq,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=pre_m, ALIGNED=_aligned(out, grad_out),
    )
    # written contiguous by the kernels; converted to the inputs' dtype/layout below
    dq = new_output((b, h, lq, d), query.dtype, query.device)
    dk = new_output((b, hkv, lk, d), key.dtype, key.device)
    dv = new_output((b, hkv, lk, d), value.dtype, value.device)
    common = (*query.stride(), *key.stride(), *value.stride(), *grad_out.stride(), *mstr)
    qk_scale = float(scale) * 1.4426950408889634
    kv_kernel, kv_cfg = _launcher("dkdv", query.device.type, d, query.dtype, meta["HAS_DROPOUT"], meta["PREC"],
                                  tma=tma_target(query.device) and tma_ok(query, grad_out),
                                  has_mask=meta["MASK_KIND"] in (1, 2))
    kv_grid = lambda META: (triton.cdiv(lk, META["BLOCK_N"]), b * hkv)  # noqa: E731
    kv_kernel[kv_grid](
        query, key, value, grad_out, lse, delta, dk, dv, mask, kspan, seed_arg, *common,
        h, hkv, lq, lk, h // hkv, _lk_bucket(lk), qk_scale, float(scale), float(dropout_p),
        **meta, **kv_cfg,
    )
    # uninitialised: the dQ kernel writes every element of dS, the causally skipped tiles as zeros
    ds = new_output((b, h, lq, lk), torch.float32, query.device) if mask_grad else delta
    q_kernel, q_cfg = _launcher("dq", query.device.type, d, query.dtype, meta["HAS_DROPOUT"], meta["PREC"],
                                tma=tma_target(query.device) and tma_ok(key, value),
                                has_mask=meta["MASK_KIND"] in (1, 2), lq=lq)
    q_grid = lambda META: (triton.cdiv(lq, META["BLOCK_M"]), b * h)  # noqa: E731
    q_kernel[q_grid](
        query, key, value, grad_out, lse, delta, dq, mask, kspan, seed_arg, ds, *common,
        h, lq, lk, h // hkv, _lk_bucket(lk), qk_scale, float(scale), float(dropout_p),
        **meta, **q_cfg, MASK_GRAD=bool(mask_grad),
    )
    if rotation is not None:
        unrotate_grad(dq, *rotation)
        unrotate_grad(dk, *rotation)
    if not mask_grad:
        return dq, dk, dv
    return dq, dk, dv, _sum_to(ds, attn_mask).to(attn_mask.dtype)


def _sum_to(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (B, H, Lq, Lk) summed over the dims ``like`` broadcasts along, in ``like``'s shape."""
    lead = full.dim() - like.dim()
    dims = list(range(lead)) + [lead + i for i, n in enumerate(like.shape) if n == 1 and full.shape[lead + i] != 1]
    return full.sum(dims, keepdim=True).reshape(like.shape) if dims else full.reshape(like.shape)


# --------------------------------------------------------------------------------------
# configurations (built lazily: importing this module never queries a device)
# --------------------------------------------------------------------------------------
# The interpreter runs each program in Python: fewer, larger tiles are faster there, and
# BLOCK_M != BLOCK_N keeps the causal block-skipping arithmetic honest in tests.
_INTERP_FWD = dict(BLOCK_M=64, BLOCK_N=32)
_INTERP_DKDV = dict(BLOCK_M=32, BLOCK_N=64)
_INTERP_DQ = dict(BLOCK_M=64, BLOCK_N=32)
# Tests set this to run the USE_TMA loops (in the interpreter, which has no autotuner to pick
# them, or untuned on a GPU); it applies where the operands meet TMA's preconditions, as the
# autotuner's TMA candidates do.
_FORCE_TMA = False

_TUNE_KEY = ["HEAD_DIM", "D0", "LK_BUCKET", "MASK_KIND", "IS_CAUSAL", "HAS_DROPOUT", "PREC", "PRESCALE"]


# (BLOCK_M, BLOCK_N, warps, stages) candidates for 2-byte dtypes and d <= 128, best guess first
# (the untuned default is the first that passes ``_fits``).  Hopper runs a 128-row tile over 8
# warps as two 64-row wgmma warpgroups; BLOCK_N = 128 halves the per-tile softmax work.  Not
# timed on a GPU yet: the order is the FlashAttention-2 / Triton-tutorial choice, and every
# candidate was compiled for sm_90 by ``mmkernels inspect`` (d = 64/72/80/88/128, with and
# without mask + dropout): none that ``_fits`` keeps spills.  Dropped after the first sweep:
# dK/dV 64×128 over 8 warps (spilled 24-400 bytes at every head dim); after dK/dV moved to
# transposed [BLOCK_N, BLOCK_M] tiles (all its products on wgmma), its 4-warp and 64×64
# candidates (spilled 8-500 bytes with causal or mask + dropout at d >= 88); 16×128 and
# single-stage 32×128 were tried and not pipelined (no cp.async).
_CANDIDATES = {
    "fwd": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
            (128, 32, 8, 3), (64, 32, 4, 2)],
    "dkdv": [(32, 128, 8, 2), (32, 64, 8, 2), (32, 64, 4, 3)],
    "dq": [(128, 32, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
}
# Query lengths <= 32 (the Q-Former's 32 learned queries: its backward, and self-attention over
# them, run these kernels): the 128-row forward / dQ tiles above would leave 3/4 of their rows
# idle, so the row-block kernels try 32-row tiles (mma.sync: wgmma needs 64 rows per warpgroup)
# and one 64-row warpgroup.  Compiled for sm_90 (blip2-qformer-cross, d=64, triton 3.6/3.9).
_CANDIDATES_SHORT_Q = {
    "fwd": [(32, 64, 4, 2), (64, 64, 4, 2), (32, 128, 4, 2)],
    "dq": [(32, 64, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2)],
}
_SHORT_Q = 32
# Tensor-descriptor (TMA, sm_90) versions of the main loops, tried by the autotuner after the
# pointer-load candidates when the operands allow (``_tma.tma_ok``): the tiles of the
# first kept pointer candidates of _TMA_TRIES distinct (BLOCK_M, BLOCK_N) shapes, with the forward's K and V,
# dQ's K and V and dK/dV's Q and dO copied by TMA instead of per-thread cp.async.  Compiled for
# sm_90 (triton 3.6 and 3.9, bf16, d = 64/72/80/88/128): TMA copies and wgmma; registers within a
# few of the pointer twin's, no spills in the plain variant (with masks or dropout a TMA twin
# spills where its pointer twin does: the tile's live state, ``_fits``'s business).
_TMA_TRIES = 2
# The TMA dK/dV loop keeps its Q/dO descriptors live through the head loop: under triton 3.6 its
# 32×128 tile at d=128 (live state 160, the limit) spilled 48 bytes with causal where the pointer
# twin (250 registers) did not; its TMA twins keep this many live values per thread spare.
_TMA_LIVE_MARGIN = {"dkdv": 16}


def _tma_offered(d: int, dtype: torch.dtype) -> bool:
    """TMA candidates exist for fp16/bf16 at d <= 128 (the swept ``_CANDIDATES``), where wgmma reads
    the TMA-filled shared-memory tiles directly.  Not for fp32: its "highest"-precision dots run on
    FMA from registers (nothing to gain), and its TMA compiles spilled (sm_90, triton 3.6/3.9,
    d=64/88: 0.3-15 KB with IEEE dots, up to 6.8 KB with TF32)."""
    return d <= 128 and dtype in (torch.float16, torch.bfloat16)
# fp32 operands (TF32 dots) or d > 128: twice the bytes per tile.  Swept for sm_90 in fp32 at
# d = 64/88/128 with and without mask + dropout; dropped for spilling there: forward 32×32 over
# 4 warps (8 bytes at d=88), dK/dV 32×32 over 4 warps (568-736 at d=88) and 64×64 single-stage
# (160-528 nearly everywhere), dQ 32×64 and 32×32 over 4 warps (24-1168 at d=88).
_CANDIDATES_BIG = {
    "fwd": [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
    "dkdv": [(32, 64, 4, 2), (16, 64, 4, 2)],
    "dq": [(64, 32, 4, 2), (64, 16, 4, 2)],
}
# fp32 (TF32) dK/dV, by computed head dim: (without dropout, with dropout).  Its 4-byte operands
# take registers the bf16 wgmma path keeps in shared memory, and no live-state rule predicted the
# sweep: 32×64 over 4 warps spilled 64 bytes at d=128 but none at d=88, 16×32 spilled 120-304 at
# d=88 but none at d=128, 16×64 with mask + dropout 48 at d=128 — so these are the measured lists.
# Re-swept under triton 3.6 (the GPU image's) and 3.9 with causal calls, dense and packed
# (docs/inspect/fp32_ieee_sm90.md): the ≤96 default 32×64 over 4 warps spilled 16-304 bytes under
# 3.6 (16×64 over 4 warps 16-144 at d=88); 16×64 over 8 warps spilled nothing at d=72/80/88 dense
# in either version (packed d=88 causal: 48-144, the least of the 6 tiles tried; nothing tried was
# spill-free there); 16×32 over 4 warps nothing at d=128.  The dropout lists were not re-swept.
_TF32_DKDV = {96: ([(16, 64, 8, 2)], [(16, 64, 8, 2)]), 128: ([(16, 32, 4, 2)], [(16, 32, 4, 2)])}
# fp32 (TF32) dQ: 64×32 over 4 warps spilled 8-224 bytes at d=88/128 under 3.6 (defaults), 64×16
# over 4 warps 16-40 packed; 64×16 over 8 warps spilled nothing (d=88/128, dense and packed, both
# versions).  The TF32 forward keeps the rule's list minus 64×64 over 4 warps above d=96 (8-16
# bytes at d=128 under 3.6).
_TF32_DQ = [(64, 16, 8, 2)]


def tf32_lists(kind: str, dp: int, has_dropout: bool, kept: list) -> list:
    """The fp32 (TF32) candidates of ``kind`` at computed head dim ``dp``: the measured lists
    above in place of, or pruned from, the rule's ``kept``."""
    if kind == "dkdv" and dp <= 128:
        return next(c[has_dropout] for limit, c in _TF32_DKDV.items() if dp <= limit)
    if kind == "dq":
        return list(_TF32_DQ)
    if kind == "fwd" and dp > 96:
        return [c for c in kept if c != (64, 64, 4, 2)] or kept
    return kept
# fp32 operands with torch's "highest" matmul precision (PREC "ieee": how HF runs BLIP-2's
# Q-Former) lower ``tl.dot`` to FMA loops that hold operand slices in registers, so the tiles
# above spill 0.2-9.6 KB there.  These were compiled for sm_90 by ``mmkernels inspect --dtype
# fp32`` (d = 64/72/80/88/128, with and without mask + dropout) and kept where none spilled:
# explicit lists per computed head dim (D0 + D1: 64, 80 for d=72/80, 96 for d=88, 128, beyond),
# not the ``_fits`` rule (register allocation of FMA dots is not monotonic in the tile: 32×32
# over 8 warps spills 8-16 bytes at d=72/80 but not at d=64 or 88).  Re-swept with causal calls
# and under triton 3.6 (the GPU image's) as well as 3.9, dense and packed: the former defaults
# spilled there — dK/dV 16×64 over 8 warps 8-32 bytes at d=72/80 (both versions), 32×32 over 8
# warps 224-560 at d=128 causal; the forward's 32×16 over 4 warps 216-368 at d=128 causal; dQ
# 32×16 over 4 warps 328 at d=128 (3.9) — and 16×32 / 16×64 over 4 warps spilled at d=72-128.
# Every candidate below compiles spill-free under both versions, plain and causal, dense and
# packed (docs/inspect/fp32_ieee_sm90.md).
_IEEE_SMALL = {"fwd": [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
               "dkdv": [(32, 32, 8, 2), (16, 64, 8, 2), (16, 16, 4, 2)],
               "dq": [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)]}
_CANDIDATES_IEEE = {
    "fwd": {64: _IEEE_SMALL["fwd"], 80: [(16, 32, 4, 2), (16, 16, 4, 2)], 96: _IEEE_SMALL["fwd"],
            128: [(32, 16, 8, 2), (16, 16, 4, 2)], 256: [(16, 16, 4, 2)]},
    "dkdv": {64: _IEEE_SMALL["dkdv"], 80: [(16, 32, 8, 2), (16, 16, 4, 2)], 96: [(32, 32, 8, 2), (16, 16, 4, 2)],
             128: [(16, 32, 8, 2), (16, 16, 4, 2)], 256: [(16, 16, 4, 2)]},
    "dq": {64: _IEEE_SMALL["dq"], 80: [(32, 32, 8, 2), (16, 16, 4, 2)], 96: _IEEE_SMALL["dq"],
           128: [(32, 16, 8, 2), (16, 16, 4, 2)], 256: [(16, 16, 4, 2)]},
}
# fp32 values a thread may keep live in accumulators and score tiles, by (kernel, dropout):
# about half of the 255 registers, the rest holding operand fragments, addresses and the
# softmax state; the transposed dK/dV tile needs fewer of those (K and V stay in shared
# memory) unless dropout's Philox state takes them; the split forward's edge loop keeps a
# little more live with dropout.
_LIVE_FP32_PER_THREAD = {("fwd", False): 128, ("fwd", True): 120, ("dq", False): 128, ("dq", True): 128,
                         ("dkdv", False): 160, ("dkdv", True): 128}
# shared memory a candidate may stage: fits an A100 (163 KB) as well as an H100 (227 KB)
_SHARED_BYTES = 160 * 1024


def _fits(kind: str, bm: int, bn: int, warps: int, stages: int, dp: int, itemsize: int, has_dropout: bool,
          extra_live: float = 0.0, extra_staged: int = 0) -> bool:
    """The pruning rule: a candidate is kept when its live fp32 state per thread and its staged
    tiles fit (``dp``: the head dim as the kernel computes it, D0 + D1).

    Live fp32 values per thread = (accumulators + score tiles) / threads, where the forward
    keeps O (bm·dp) and S/P (bm·bn), dK/dV keeps dK and dV (2·bn·dp) and S, dP (2·bm·bn), dQ
    keeps dQ (bm·dp) and S, dP (2·bm·bn); dropout counts as one more score tile (the Philox
    words of a quarter of the tile and the keep bits: ``_tiles._dropout_keep``; it counted two
    while every score drew its own Philox call — with one call per 4 keys, sm_90 bf16 compiles of
    every dropout candidate this rule keeps at d=64/72/88/128, with and without a padding mask,
    spill nothing under triton 3.9 and 3.6: forward 128×64 and dK/dV 32×128 defaults at d <= 88
    and d <= 72).  Calibrated on sm_90 bf16 compiles (two-tile dropout, before that): forward
    128×64 over 4 warps spilled 176 bytes at d=128 (192 values) but not at d=88 (160); with mask
    + dropout, 128×64 over 8 warps spilled 24 bytes at d=72/88 (136), and since the forward's
    loop is split into interior and edge tiles 24 bytes at d=64 too (128); transposed dK/dV
    32×128 over 8 warps: no spill at d=128 (160), with mask + dropout none at d=64 (128) but 8
    bytes at d=72/80 (144).  Staged bytes =
    the resident tile (bm·dp, or bn·dp twice for dK/dV) + ``stages`` buffers of the streamed
    tiles (K and V: 2·bn·dp; Q and dO: 2·bm·dp).  ``extra_live`` (fp32 values per thread) and
    ``extra_staged`` (bytes): what a caller's kernel keeps on top of these (the packed kernels'
    sequence bookkeeping, ``attention_varlen._gpu_configs``).
    """
    scores = (1 if kind == "fwd" else 2) + int(has_dropout)
    acc = 2 * bn * dp if kind == "dkdv" else bm * dp
    live = (acc + scores * bm * bn) / (32 * warps)
    if kind == "dkdv":
        staged = 2 * bn * dp + stages * 2 * bm * dp
    else:
        staged = bm * dp + stages * 2 * bn * dp
    return (live + extra_live <= _LIVE_FP32_PER_THREAD[kind, has_dropout]
            and staged * itemsize + extra_staged <= _SHARED_BYTES)


def _extra_state(kind: str, bm: int, bn: int, warps: int, has_mask: bool) -> tuple[float, int]:
    """(live fp32 values per thread, staged bytes) a candidate keeps on top of ``_fits``' model:
    a user mask's tile (one more [bm, bn] score tile: measured, a bool padding mask alone made the
    128×128 forward spill 1.9 KB at d=64-88)."""
    return (bm * bn / (32 * warps) if has_mask else 0.0), 0


def _gpu_configs(kind: str, d: int, dtype: torch.dtype, has_dropout: bool = False, prec: str = "tf32",
                 tma: bool = False, has_mask: bool = False, short_q: bool = False) -> list:
    """The launch candidates of one kernel that pass ``_fits`` (never none: the one with the
    least live state is kept if all fail); the first is the default used without autotuning.
    ``prec`` "ieee" (fp32, "highest" matmul precision): the measured FMA-dot lists.  With ``tma``
    (the operands meet TMA's preconditions, ``_tma.tma_ok``) and ``_tma_offered``, TMA versions
    of the first kept tiles follow (``_TMA_TRIES``), with ``USE_TMA=True``: never first, so an
    untuned launch (``MMKERNELS_AUTOTUNE=0``) keeps the pointer loads and the autotuner chooses
    between the two.  ``short_q`` (Lq <= 32): the 32/64-row lists of the row-block kernels."""
    d0, d1 = split_head_dim(d)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if prec == "ieee" and dtype == torch.float32:
        kept = next(c for limit, c in _CANDIDATES_IEEE[kind].items() if d0 + d1 <= limit)
    else:
        big = d > 128 or dtype == torch.float32
        cands = (_CANDIDATES_BIG if big else _CANDIDATES)[kind]
        if short_q and not big and kind in _CANDIDATES_SHORT_Q:
            cands = _CANDIDATES_SHORT_Q[kind]
        kept = [c for c in cands
                if _fits(kind, *c, d0 + d1, itemsize, has_dropout, *_extra_state(kind, c[0], c[1], c[2], has_mask))]
        kept = kept or [cands[-1]]
        if dtype == torch.float32:
            kept = tf32_lists(kind, d0 + d1, has_dropout, kept)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in kept]
    if tma and _tma_offered(d, dtype):
        tiles: dict = {}
        for bm, bn, w, st in kept:
            if len(tiles) < _TMA_TRIES and _fits(kind, bm, bn, w, st, d0 + d1, itemsize, has_dropout,
                                                 extra_live=_TMA_LIVE_MARGIN.get(kind, 0)):
                tiles.setdefault((bm, bn), (w, st))
        configs += [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "USE_TMA": True}, num_warps=w, num_stages=st)
                    for (bm, bn), (w, st) in tiles.items()]
    return configs


def _launcher(kind: str, device_type: str, d: int, dtype: torch.dtype, has_dropout: bool = False,
              prec: str = "tf32", tma: bool = False, has_mask: bool = False, lq: int | None = None):
    """(kernel, launch kwargs): fixed tiles in the interpreter; on CUDA see ``gpu_launcher``.
    ``tma``: the operands allow the TMA candidates.  With ``_FORCE_TMA`` (tests) and ``tma`` the
    launch runs USE_TMA: the interpreter's tiles with it, on CUDA the first TMA candidate untuned."""
    tma = tma and _tma_offered(d, dtype)
    force = tma and _FORCE_TMA
    if not for_gpu(device_type):
        return _KERNELS[kind], dict(_INTERP[kind], USE_TMA=True) if force else _INTERP[kind]
    if tma and device_type == "cuda":
        ensure_allocator()  # TMA candidates build their descriptors in a scratch buffer

    short_q = lq is not None and lq <= _SHORT_Q and kind in _CANDIDATES_SHORT_Q

    def configs():
        return _gpu_configs(kind, d, dtype, has_dropout, prec, tma, has_mask, short_q)

    if force:
        cfg = next(c for c in configs() if c.kwargs.get("USE_TMA"))
        return _KERNELS[kind], dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return gpu_launcher(_KERNELS[kind], configs, _TUNE_KEY,
                        ("attention", kind, d, dtype, has_dropout, prec, tma, has_mask, short_q))


_KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
_INTERP = {"fwd": _INTERP_FWD, "dkdv": _INTERP_DKDV, "dq": _INTERP_DQ}
