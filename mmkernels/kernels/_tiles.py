"""Tiles and launch helpers shared by the attention-family kernels (``attention``,
``attention_varlen``, ``attention_scores``, ``qformer_cross_attention``): the masked row/column loaders with
their alignment hint, the logits with bounds/causal/user masks, the online-softmax step, the
row statistics, Philox dropout, the backward scores (``_bwd_scores``, either tile
orientation); and the host-side helpers every launcher uses (head-dim split, dot precision,
mask strides, alignment, rotary arguments).

Interpreter note: ``tl.dot`` on bf16 operands is wrong in the Triton interpreter (measured:
max error ~5e10 on a 16×32·32×16 product), so under TRITON_INTERPRET bf16 tiles are upcast
to fp32 right before each dot (UPCAST).  Products of bf16 values are exact in fp32, so this
matches the GPU's bf16 MMA with fp32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import masks_keys_only

LOG2E = tl.constexpr(1.4426950408889634)


# --------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_chunks(a0, a1, b0, b1, D1: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a·b contracted over a head dim split into chunks D0 + D1 (``split_head_dim``): a0·b0, plus
    a1·b1 when D1 > 0."""
    acc = _dot(a0, b0, PREC, UPCAST)
    if D1 > 0:
        acc += _dot(a1, b1, PREC, UPCAST)
    return acc


@triton.jit
def _load_rows(base, rows, row_ok, stride_r, offs_d, stride_d, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """Tile [rows, d] of a (L, D) matrix; out-of-range rows/columns read 0.

    ALIGNED: the launcher checked that every row starts 16-byte aligned (``_aligned``).  Triton
    only learns alignment from 16-divisible integers, so without the hint head dims 72 and 88
    (row strides 72, 88) load 2 bytes at a time and are not pipelined (sm_90 bf16 forward:
    160 / 192 scalar loads and no cp.async; with it, 16-byte cp.async like d=64)."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [1, 16])  # pointer divisibility is in bytes
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _load_cols(base, cols, col_ok, stride_c, offs_d, stride_d, HEAD_DIM: tl.constexpr, ALIGNED: tl.constexpr):
    """Transposed tile [d, cols] of a (L, D) matrix; out-of-range entries read 0 (ALIGNED: as
    in ``_load_rows``)."""
    ptrs = base + offs_d[:, None] * stride_d + cols[None, :] * stride_c
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, [16, 1])
    return tl.load(ptrs, mask=(offs_d < HEAD_DIM)[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _load_rows2(base, rows, row_ok, stride_r, stride_d, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                ALIGNED: tl.constexpr):
    """The two head-dim chunks [rows, D0] and [rows, D1] of a (L, D) matrix (D1 = 0: the second
    is the first again, unused)."""
    t0 = _load_rows(base, rows, row_ok, stride_r, tl.arange(0, D0), stride_d, HEAD_DIM, ALIGNED)
    t1 = t0
    if D1 > 0:
        t1 = _load_rows(base, rows, row_ok, stride_r, D0 + tl.arange(0, D1), stride_d, HEAD_DIM, ALIGNED)
    return t0, t1


@triton.jit
def _load_cols2(base, cols, col_ok, stride_c, stride_d, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                ALIGNED: tl.constexpr):
    """The two head-dim chunks of a transposed tile: [D0, cols] and [D1, cols]."""
    t0 = _load_cols(base, cols, col_ok, stride_c, tl.arange(0, D0), stride_d, HEAD_DIM, ALIGNED)
    t1 = t0
    if D1 > 0:
        t1 = _load_cols(base, cols, col_ok, stride_c, D0 + tl.arange(0, D1), stride_d, HEAD_DIM, ALIGNED)
    return t0, t1


@triton.jit
def _store_rows(base, val, rows, row_ok, stride_r, offs_d, stride_d, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _mask_logits(
    s, rows, cols, row_ok, col_ok, mask_base, smm, smn, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
):
    """Apply bounds (rows and columns), causal and user masks to already-scaled base-2 logits
    ``s`` [rows, cols] (-inf where not allowed): :func:`_tile_logits` on every tile."""
    ok = row_ok[:, None] & col_ok[None, :]
    return _tile_logits(s, rows[:, None], cols[None, :], ok, ok, mask_base, smm, smn, 1.0, MASK_KIND, False, True, True,
                        IS_CAUSAL)


@triton.jit
def _logits(
    q0, q1, kT0, kT1, rows, cols, row_ok, col_ok, mask_base, smm, smn, qk_scale,
    D1: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """S = (Q Kᵀ·scale + mask)·log2(e) for one [BLOCK_M, BLOCK_N] tile, -inf where not allowed."""
    s = _dot_chunks(q0, q1, kT0, kT1, D1, PREC, UPCAST)
    return _mask_logits(s * qk_scale, rows, cols, row_ok, col_ok, mask_base, smm, smn, MASK_KIND, IS_CAUSAL)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """Online-softmax update for one tile of base-2 logits: (P, rescale of the old state, m, l)."""
    return _online_softmax(s, 1.0, m_i, l_i)


@triton.jit
def _phase_range(phase: tl.constexpr, lo, mid, hi):
    """Bounds of one phase of a two-phase block loop (``for phase in tl.static_range(2)``):
    phase 0 is [lo, mid), phase 1 [max(lo, mid), hi).  The kernels put the tiles that need no
    mask work in one phase and the masked ones (causal band, ragged end) in the other, so each
    phase compiles to its own loop without the other's selects."""
    if phase == 0:
        start = lo
        end = mid
    else:
        start = tl.maximum(lo, mid)
        end = hi
    return start, end


@triton.jit
def _online_softmax(s, scale, m_i, l_i):
    """Online-softmax update for one tile whose base-2 logits are ``s·scale`` (``scale`` > 0):
    (P, rescale of the old state, m, l).  The scale is folded into the max-subtract, so each
    score costs one FMA before its exp2 (max(s)·scale = max(s·scale) because scale > 0, and a
    masked -inf stays -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
    # rows with nothing visible yet keep m = -inf: shift by 0 so exp2 gives 0, not NaN
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _clamp_bias(mval):
    """An additive mask value (fp32) as the logits take it: HF's finfo.min clamped to -1e30
    (×log2 e must not overflow to -inf), true -inf kept, and NaN kept — a NaN entry gives a NaN
    logit (SDPA's math), not a masked one; the default maximum (max.f32) would return -1e30 for
    it, PropagateNan.ALL is max.NaN.f32, the same single instruction."""
    return tl.where(mval == float("-inf"), mval, tl.maximum(mval, -1.0e30, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _key_mask(mask_base, kj, k_ok, smn, qk_scale, MASK_KIND: tl.constexpr, PRESCALE: tl.constexpr):
    """The per-key mask of a key-only mask (one row per batch, ``kj`` the key indices as a
    [1, n] or [n, 1] vector): MASK_KIND 3 (bool) the keep flags, out-of-range keys dropped;
    MASK_KIND 4 (additive) the bias in the units of :func:`_tile_logits`' logits — base 2, and
    divided by ``qk_scale`` unless PRESCALE (the logits are then raw products, scaled in the
    exp2's FMA: no pre-scaling multiply per score) — with finfo.min clamped to -1e30 as there,
    -inf and NaN kept (:func:`_clamp_bias`); out-of-range keys -inf."""
    if MASK_KIND == 3:
        km = tl.load(mask_base + kj * smn, mask=k_ok, other=0) != 0
    else:
        mval = tl.load(mask_base + kj * smn, mask=k_ok, other=float("-inf")).to(tl.float32)
        mval = _clamp_bias(mval)
        if PRESCALE:
            km = mval * LOG2E
        else:
            km = mval * (LOG2E / qk_scale)
    return km


@triton.jit
def _apply_key_mask(s, km, MASK_KIND: tl.constexpr):
    """``s`` with a :func:`_key_mask` applied (broadcast along the query axis)."""
    if MASK_KIND == 3:
        return tl.where(km, s, float("-inf"))
    else:
        return s + km


@triton.jit
def _tile_logits(
    s, qi, kj, k_ok, ld_ok, mask_base, smm, smn, qk_scale,
    MASK_KIND: tl.constexpr, PRESCALE: tl.constexpr, EDGE: tl.constexpr, BOUNDS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, kmask=None,
):
    """Masks of one tile of raw products ``s`` (Q Kᵀ, or K Qᵀ in the transposed dK/dV tile:
    ``qi``/``kj`` are the query/key indices broadcast to ``s``'s shape), in either orientation.

    Returns logits L such that the base-2 logits are ``L·scale`` with ``scale = 1`` when
    PRESCALE (additive masks, and scales <= 0, whose sign would flip the max) and ``qk_scale``
    otherwise — the caller folds it into its exp2's FMA.  Mask work is paid only where needed:
    the user mask on every tile (``ld_ok`` bounds its loads), the key bounds (``k_ok``, when
    BOUNDS) and the causal triangle only on EDGE tiles — interior tiles are fully in range and
    fully below the diagonal, so they skip both selects.
    """
    if PRESCALE:
        s = s * qk_scale
    if MASK_KIND >= 3:
        # a key-only mask (key padding): the kernels run interior tiles only over keys it keeps
        # with bias 0 (``key_spans``), so it is read on EDGE tiles only, one value per key —
        # or applied from ``kmask``, read once by the caller (the dK/dV program's own keys)
        if kmask is not None:
            s = _apply_key_mask(s, kmask, MASK_KIND)
        elif EDGE:
            s = _apply_key_mask(s, _key_mask(mask_base, kj, k_ok, smn, qk_scale, MASK_KIND, PRESCALE), MASK_KIND)
    elif MASK_KIND != 0:
        mval = tl.load(mask_base + qi * smm + kj * smn, mask=ld_ok, other=0)
        if MASK_KIND == 1:
            s = tl.where(mval != 0, s, float("-inf"))
        else:
            mval = mval.to(tl.float32)
            mval = _clamp_bias(mval)
            s += mval * LOG2E
    if EDGE:
        if BOUNDS:
            if IS_CAUSAL:
                s = tl.where(k_ok & (kj <= qi), s, float("-inf"))
            else:
                s = tl.where(k_ok, s, float("-inf"))
        elif IS_CAUSAL:
            s = tl.where(kj <= qi, s, float("-inf"))
    return s


@triton.jit
def _bwd_scores(
    s, dp, qi, kj, k_ok, ld_ok, mask_base, smm, smn, qk_scale, m_row, log2l, delta, seed, LK, dropout_p,
    drop_rows, n0,
    MASK_KIND: tl.constexpr, PRESCALE: tl.constexpr, EDGE: tl.constexpr, BOUNDS: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr,
    kmask=None,
):
    """(P̃, dS) of one backward tile from the raw products ``s`` = Q Kᵀ and ``dp`` = dO Vᵀ, in
    either orientation (the row statistics ``m_row``, ``log2l``, ``delta`` and the indices
    ``qi``/``kj`` come broadcast to the tile's shape).  P is rebuilt from the forward's
    statistics (m = +inf: no visible key, P = 0); P̃ = P after dropout and 1/(1-p) (dV = P̃ᵀ dO);
    dS = P ∘ (dP̃ − delta) (dQ = dS K·scale, dK = dSᵀ Q·scale).  Dropout draws are indexed by the
    1-D row indices ``drop_rows`` and the tile's first key ``n0`` (:func:`_dropout_keep`; TRANSPOSED:
    the [keys, rows] tile).

    Out-of-range queries need no mask (m = +inf: P = 0).  Out-of-range keys (zero rows) get
    P = exp2(-m), which overflows when a row's logits are all very negative (HF's finfo.min
    padding): the dQ kernel bounds-masks its ragged key block (BOUNDS); the dK/dV kernel need
    not — such a key's values only reach its own dK/dV row, which is never stored.  The
    causal triangle and the bounds are applied on EDGE tiles only.
    """
    s = _tile_logits(s, qi, kj, k_ok, ld_ok, mask_base, smm, smn, qk_scale, MASK_KIND, PRESCALE, EDGE, BOUNDS,
                     IS_CAUSAL, kmask)
    scale = qk_scale
    if PRESCALE:
        scale = 1.0
    p = tl.math.exp2((s * scale - m_row) - log2l)
    pd = p
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, drop_rows, n0, LK, dropout_p, BLOCK_N, TRANSPOSED)
        inv_keep = 1.0 / (1.0 - dropout_p)
        pd = tl.where(keep, p * inv_keep, 0.0)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    return pd, p * (dp - delta)


@triton.jit
def _finish_rows(STATS, bh, LQ, rows, row_ok, m_i, l_i, dropout_p, HAS_DROPOUT: tl.constexpr):
    """Store a block's softmax statistics; return the factor that normalises its accumulator.

    The log-sum-exp is kept as (row max, log2 of the row sum), both base 2: a row whose logits
    all sit on HF's finfo.min floor has max ~-1.4e30, where max + log2(sum) would round the
    log2(sum) away and the backward would rebuild P = 1 instead of 1/n.  Rows with no visible
    key get max = +inf (the backward's P is then 0) and a zero output.
    """
    empty = l_i == 0.0
    stats = STATS + bh * 2 * LQ + rows
    tl.store(stats, tl.where(empty, float("inf"), m_i), mask=row_ok)
    tl.store(stats + LQ, tl.math.log2(tl.where(empty, 1.0, l_i)), mask=row_ok)
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    return inv_l


@triton.jit
def _dropout_keep(seed, rows, n0, LK, dropout_p, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Philox keep-mask (True = kept) of the tile of query rows ``rows`` (1-D) and the BLOCK_N keys
    from ``n0`` (a multiple of 4): [rows, keys], or [keys, rows] when TRANSPOSED (the dK/dV tile).
    The same (seed, row, key) gives the same bit in the forward and both backward kernels.

    One Philox call (``tl.randint4x``: 4 words of 32 bits) covers 4 consecutive keys of a row:
    counter = row·ceil(LK/4) + key/4, and the key's word is fixed by key % 4.  ``tl.rand`` per
    element computed the 4 words and kept one, so this is a quarter of the Philox work; a key
    is kept when its word is >= dropout_p·2³² (probability 1 - dropout_p up to 2⁻³²)."""
    g = n0 // 4 + tl.arange(0, BLOCK_N // 4)
    stride = (LK + 3) // 4
    if TRANSPOSED:
        offs = rows[None, :] * stride + g[:, None]  # [BLOCK_N / 4, rows]
    else:
        offs = rows[:, None] * stride + g[None, :]  # [rows, BLOCK_N / 4]
    r0, r1, r2, r3 = tl.randint4x(seed, offs)
    thr = tl.cast(dropout_p * 4294967296.0, tl.uint32)
    # the 4 words of a group side by side on two new minor axes: [.., 2, 2], key 4g + 2a + b
    # holds word a + 2b (any fixed bijection would do; this one is what two joins give)
    k4 = tl.join(tl.join(r0 >= thr, r1 >= thr), tl.join(r2 >= thr, r3 >= thr))
    if TRANSPOSED:
        keep = tl.reshape(tl.permute(k4, (0, 2, 3, 1)), (BLOCK_N, rows.shape[0]))
    else:
        keep = tl.reshape(k4, (rows.shape[0], BLOCK_N))
    return keep


# --------------------------------------------------------------------------------------
# host-side helpers of the launchers
# --------------------------------------------------------------------------------------
def split_head_dim(d: int) -> tuple[int, int]:
    """Power-of-two chunks (D0, D1) covering head dim ``d`` (D1 = 0: one chunk).

    ``tl.dot`` needs every dim >= 16 and a power of two.  72 → (64, 16), 80 → (64, 16),
    88 → (64, 32), 96 → (64, 32), 136 → (128, 16); when two chunks would not save columns
    over the next power of two (112 → 64+64 = 128) one chunk is used.
    """
    full = max(16, triton.next_power_of_2(d))
    d0 = max(16, 1 << (d.bit_length() - 1))
    if d0 >= d:
        return d0, 0
    d1 = max(16, triton.next_power_of_2(d - d0))
    if d0 + d1 >= full:
        return full, 0
    return d0, d1


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # fp32 with "high"/"medium"; for fp16/bf16 operands the flag is ignored


def _mask_args(attn_mask, b, h, lq, lk, like, key_only=False):
    """(tensor, kind, strides) of the mask's broadcast view; never materialised.  Kinds: 0 none,
    1 bool, 2 additive; with ``key_only`` (the kernels of :mod:`.attention`) a mask that only masks
    keys — broadcast over heads and queries, a (B, 1, 1, Lk) padding mask — is kind 3 (bool) or 4
    (additive), read one value per key (:func:`_key_mask`) and paired with :func:`key_spans`."""
    if attn_mask is None:
        return like, 0, (0, 0, 0, 0)
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(b, h, lq, lk)
    kind = 1 if m.dtype == torch.bool else 2
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes; uint8 loads are the portable path
    if key_only and masks_keys_only(m, m.shape):
        kind += 2
    return m, kind, m.stride()


def key_spans(mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) int32 on the mask's device, per batch row of a key-only mask (B, H, Lq, Lk) view:
    [0] the keys the kernels visit, [0, last kept key + 1), and [1] the length of the leading run
    of keys kept with no bias (bool True, additive 0.0) — the interior tiles, which skip the mask.

    A key is dropped (never visited) when the mask hides it exactly: bool False, additive -inf,
    or an additive value <= -1e30 (HF's finfo.min padding of fp32/bf16 masks) in a row that has a
    key above -1e29 — such a key's probability is exp2(-1.3e30) = 0 in fp32 next to it, and the
    kernels clamp finfo.min to -1e30 anyway.  fp16 masks' finfo.min (-65504) stays a bias (read
    on the edge tiles).  Device ops only, no host read (the key-only twin of the mask rows)."""
    m = mask[:, 0, 0, :]
    if m.dtype == torch.uint8:
        kept = m != 0
        free = kept
    else:
        floor = (m <= -1.0e30) & (m.amax(dim=-1, keepdim=True) > -1.0e29)
        kept = ~(torch.isneginf(m) | floor)
        free = m == 0
    lk = m.shape[-1]
    idx = torch.arange(1, lk + 1, device=m.device, dtype=torch.int32)
    visit = (kept.to(torch.int32) * idx).amax(dim=-1) if lk else torch.zeros(m.shape[0], dtype=torch.int32,
                                                                              device=m.device)
    lead = free.to(torch.int32).cumprod(dim=-1).sum(dim=-1, dtype=torch.int32)
    return torch.stack((visit.to(torch.int32), lead), dim=-1).contiguous()


def rotary_args(cos, sin, like):
    """(cos, sin, ROTARY kind, (batch, row, col) strides) for the kernels: 0 without rotary;
    1 when cos/sin hold D columns, 2 for D/2.  cos/sin (L, ·) are shared by the batch (stride 0);
    (B, L, ·) are per batch row.  cos and sin must share strides (the op layers ensure it)."""
    if cos is None:
        return like, like, 0, (0, 0, 0)
    kind = 1 if cos.shape[-1] == like.shape[-1] else 2
    shared = cos.dim() == 2 or cos.shape[0] == 1
    strides = (0 if shared else cos.stride(0), *cos.stride()[-2:])
    return cos, sin, kind, strides


def _aligned(*tensors: torch.Tensor) -> bool:
    """Whether every row of these (..., L, D) tensors starts 16-byte aligned: unit last-dim
    stride, every other stride a multiple of 8 elements, base address 16-byte aligned (the
    kernels' ALIGNED hint; see ``_load_rows``)."""
    return all(t.stride(-1) == 1 and all(st % 8 == 0 for st in t.stride()[:-1]) and t.data_ptr() % 16 == 0
               for t in tensors)
