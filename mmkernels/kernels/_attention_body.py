"""The one body of each attention kernel — forward, dK/dV, dQ — shared by the dense
(:mod:`.attention`, (B, H, L, D)) and the packed (:mod:`.attention_varlen`, (total, H, D) with
``cu_seqlens``) kernels.

Dense is packed with implicit boundaries: batch b is sequence b, its rows start at b·stride_b
and its lengths are the constants LQ / LK.  What differs is only *which tile a program owns*
and *where its rows live*, so each kernel entry point (``_attn_fwd``, ``_varlen_fwd``, …) is a
thin prologue — program id → (sequence, first row, row/column bases, lengths, Philox stream,
statistics rows) — that calls the body here; the body holds the loads, the two-phase key (or
query) loops, the scores and the epilogue once.  Both entry points stay separate jitted kernels
(the launchers, the autotuner keys and ``compile_report``'s kernel names tell them apart).

The constexpr ``VARLEN`` selects what the layouts do differently inside the body:

* causal alignment: top-left for dense (SDPA), bottom-right for packed (flash-attn's varlen),
  expressed as a shifted row index ``rows_c = rows + (LK - LQ)`` passed to the shared top-left
  causal test (dense passes ``rows`` itself), and the block ranges of :func:`_key_range` /
  :func:`_query_range`;
* the per-head rows of the softmax statistics, ``delta`` and the Philox stream in the dK/dV head
  loop (dense: (batch·H + head) rows of length LQ; packed: head rows of length total_q at the
  sequence's offset, Philox keyed by (sequence·H + head));
* the bounds of the dQ loop's interior key blocks: packed loads them unpredicated (constant-true
  column mask), dense keeps its measured code (the bounds predicate; changing it would change
  the dense SASS this refactor keeps identical).

Dense-only features are constexpr-disabled for packed launches: user masks (``MASK_KIND`` 0),
the mask gradient (``MASK_GRAD``) and the TMA loads (``USE_TMA``).  The tile helpers (online
softmax, tile logits, backward scores, dropout, loaders) are those of :mod:`._tiles`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._fp8 import _fp8_finish, _fp8_p, _fp8_qk_scale
from ._tiles import (
    _bwd_scores,
    _dot,
    _dot_chunks,
    _dropout_keep,
    _finish_rows,
    _key_mask,
    _load_cols2,
    _load_rows2,
    _online_softmax,
    _phase_range,
    _store_rows,
    _tile_logits,
)
from ._tma import _row_descs, _tma_cols2, _tma_rows2

# Philox key stride between (sequence or batch, head) streams
SEED_STRIDE = tl.constexpr(1000003)


# --------------------------------------------------------------------------------------
# block ranges
# --------------------------------------------------------------------------------------
@triton.jit
def _key_range(m_start, LQ, LK, KSPAN, b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MASK_KIND: tl.constexpr):
    """(hi, mid) of the key loop of query rows [m_start, m_start + BLOCK_M): keys [0, hi) can be
    visible; blocks [0, mid) are interior (entirely inside LK and, causal, entirely visible to
    the block's first row, hence to all of them: no bounds or causal select); [mid, hi) holds
    the diagonal band and the ragged last block (the edge).

    Dense (top-left): row i sees key j iff j <= i.  Packed (bottom-right): iff j <= i + (LK - LQ),
    so the last row sees keys up to m_start + BLOCK_M - 1 + LK - LQ, and a key block
    [n, n + BLOCK_N) is fully visible to row m_start iff n + BLOCK_N <= m_start + LK - LQ + 1
    (clamped at 0: with LQ > LK the first rows see nothing).

    A key-only mask (MASK_KIND 3/4) narrows both to its spans of batch row ``b``
    (``_tiles.key_spans`` in KSPAN): keys past the last kept one are never visited, and the
    interior (mask-free) blocks end where the leading run of unbiased kept keys does."""
    full = (LK // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        if VARLEN:
            hi = tl.minimum(LK, m_start + BLOCK_M + (LK - LQ))
            mid = tl.minimum(full, tl.maximum(m_start + (LK - LQ) + 1, 0) // BLOCK_N * BLOCK_N)
        else:
            hi = tl.minimum(LK, m_start + BLOCK_M)
            mid = tl.minimum(full, m_start // BLOCK_N * BLOCK_N)
    else:
        hi = LK
        mid = full
    if MASK_KIND >= 3:
        hi = tl.minimum(hi, tl.load(KSPAN + b * 2))
        mid = tl.minimum(mid, tl.load(KSPAN + b * 2 + 1) // BLOCK_N * BLOCK_N)
    return hi, mid


@triton.jit
def _query_range(n_start, LQ, LK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 VARLEN: tl.constexpr):
    """(lo, band) of the dK/dV query loop of keys [n_start, n_start + BLOCK_N): query blocks
    [lo, band) cross the key block's causal diagonal (masked), [band, LQ) see all of its keys
    (no mask work); without causal every block is mask-free (0, 0).  Query row i sees key j iff
    j <= i + off (off = 0 dense, LK - LQ packed): rows before n_start - off contribute nothing,
    and a block whose first row is >= the last key - off sees the whole key block."""
    lo = 0
    band = 0
    if IS_CAUSAL:
        if VARLEN:
            off = LK - LQ
            lo = (tl.maximum(n_start - off, 0) // BLOCK_M) * BLOCK_M
            band = tl.minimum(tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, LQ)
        else:
            lo = (n_start // BLOCK_M) * BLOCK_M
            band = tl.minimum(tl.cdiv(n_start + BLOCK_N, BLOCK_M) * BLOCK_M, LQ)
    return lo, band


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------
@triton.jit
def _fwd_body(
    Q, K, V, O, LSE, MASK, KSPAN, SEED,
    qb, kb, h, hk, stream, rows, rows_c, row_ok, m_start, LQ, LK, STAT_L, stat_bh,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    smb, smh, smm, smn,
    qk_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, VARLEN: tl.constexpr,
    DESC=None, FP8: tl.constexpr = False,
    SC=None, SW=None, ssh=0, score_w=1.0, SCORES: tl.constexpr = 0,
):
    """One forward program: query rows ``rows`` = m_start + [0, BLOCK_M) of the sequence whose
    query rows start at Q + qb·sqb (dense: batch qb, its stride; packed: first token, token
    stride) and keys at K + kb·skb, head h (kv head hk); ``rows_c`` the causal/dropout row
    index.  Keys [0, hi) in two phases (interior [0, mid) first, :func:`_key_range`); O stored
    at O + qb·sob + h·soh, the softmax statistics at row ``stat_bh`` of (·, 2, STAT_L) (packed:
    at the sequence's offset qb).  Philox stream ``stream``.

    FP8 (:mod:`._fp8`, inference): Q, K, V are float8_e4m3fn, row ``stat_bh`` of DESC (·, 3) fp32
    holds the (q, k, v) descales; q·k descales fold into the exp2 scale, P is quantised to e4m3 for
    P·V and the v descale is applied in the epilogue.

    SCORES (packed only; 0 = off, the plain kernel): key importance from this program's rows,
    added into SC after the output is stored — :func:`_scores_epilogue`."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)

    q_base = Q + qb * sqb + h * sqh
    k_base = K + kb * skb + hk * skh
    v_base = V + kb * svb + hk * svh
    mask_base = MASK + qb * smb + h * smh

    q0, q1 = _load_rows2(q_base, rows, row_ok, sqm, sqd, HEAD_DIM, D0, D1, ALIGNED)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED) + stream.to(tl.int64) * SEED_STRIDE

    if FP8:
        qk_scale = _fp8_qk_scale(DESC, stat_bh, qk_scale)
    scale = qk_scale
    if PRESCALE:
        scale = 1.0
    hi, mid = _key_range(m_start, LQ, LK, KSPAN, qb, BLOCK_M, BLOCK_N, IS_CAUSAL, VARLEN, MASK_KIND)
    if USE_TMA:
        kd0, kd1 = _row_descs(k_base, LK, skn, HEAD_DIM, BLOCK_N, D0, D1)
        vd0, vd1 = _row_descs(v_base, LK, svn, HEAD_DIM, BLOCK_N, D0, D1)
    for phase in tl.static_range(2):
        lo_n, hi_n = _phase_range(phase, 0, mid, hi)
        for start_n in range(lo_n, hi_n, BLOCK_N):
            cols = start_n + offs_n
            if phase == 0:
                col_ok = offs_n < BLOCK_N  # constant true: the loads lose their predicates
            else:
                col_ok = cols < LK
            if USE_TMA:
                kT0, kT1 = _tma_cols2(kd0, kd1, start_n, D0, D1)
            else:
                kT0, kT1 = _load_cols2(k_base, cols, col_ok, skn, skd, HEAD_DIM, D0, D1, ALIGNED)
            s = _dot_chunks(q0, q1, kT0, kT1, D1, PREC, UPCAST)
            s = _tile_logits(s, rows_c[:, None], cols[None, :], col_ok[None, :], row_ok[:, None] & col_ok[None, :],
                             mask_base, smm, smn, qk_scale, MASK_KIND, PRESCALE, phase == 1, True, IS_CAUSAL)
            p, alpha, m_i, l_i = _online_softmax(s, scale, m_i, l_i)
            if HAS_DROPOUT:
                p = tl.where(_dropout_keep(seed, rows_c, start_n, LK, dropout_p, BLOCK_N), p, 0.0)
            if FP8:
                p = _fp8_p(p)
            p = p.to(V.dtype.element_ty)
            if USE_TMA:
                v0, v1 = _tma_rows2(vd0, vd1, start_n, D0, D1)
            else:
                v0, v1 = _load_rows2(v_base, cols, col_ok, svn, svd, HEAD_DIM, D0, D1, ALIGNED)
            acc0 = acc0 * alpha[:, None] + _dot(p, v0, PREC, UPCAST)
            if D1 > 0:
                acc1 = acc1 * alpha[:, None] + _dot(p, v1, PREC, UPCAST)

    if VARLEN:
        stat_rows = qb + rows  # packed statistics: (H, 2, total_q)
    else:
        stat_rows = rows
    inv_l = _finish_rows(LSE, stat_bh.to(tl.int64), STAT_L, stat_rows, row_ok, m_i, l_i, dropout_p, HAS_DROPOUT)
    if FP8:
        inv_l = _fp8_finish(DESC, stat_bh, inv_l)
    o_base = O + qb * sob + h * soh
    _store_rows(o_base, acc0 * inv_l[:, None], rows, row_ok, som, offs_d0, sod, HEAD_DIM)
    if D1 > 0:
        _store_rows(o_base, acc1 * inv_l[:, None], rows, row_ok, som, offs_d1, sod, HEAD_DIM)
    if SCORES:
        _scores_epilogue(SC, SW, q0, q1, k_base, mask_base, kb, qb, h, rows, rows_c, row_ok, m_i, l_i, mid, hi, LK,
                         ssh, score_w, skn, skd, smm, smn, qk_scale, scale, HEAD_DIM, D0, D1, MASK_KIND, IS_CAUSAL,
                         PREC, UPCAST, ALIGNED, PRESCALE, BLOCK_N, SCORES)


@triton.jit
def _scores_epilogue(
    SC, SW, q0, q1, k_base, mask_base, kb, qb, h, rows, rows_c, row_ok, m_i, l_i, mid, hi, LK,
    ssh, score_w, skn, skd, smm, smn, qk_scale, scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRESCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, SCORES: tl.constexpr,
):
    """Key importance of the forward's row block, exact: once the key loop has the rows' final
    max m and sum l, the same keys [0, hi) are visited again (interior tiles [0, mid) without
    bounds / causal selects, then the edge, as the key loop) with the Q tile still in registers,
    and Pᵀ = exp2(Sᵀ·scale − m) / l rebuilt tile by tile on transposed tiles Sᵀ = K Qᵀ; each
    tile's sums over the rows, weighted per row, are added atomically (fp32) into
    SC + h·ssh + (kb + key) (ssh = 0: heads reduced into one row, ``score_w`` = 1/H for their
    mean).  SCORES 1: every row of the block, weight 1; SCORES 2: row weights SW (total_q,) fp32
    (the count of times a row is selected), and a block with no selected row skips the loop.
    The extra work is one Q Kᵀ per visited tile (no V, no P·V): ~1/2 of the forward's FLOPs for
    the block.  Rows with no visible key (l = 0) add 0; a NaN row stays NaN, in its own
    sequence's keys only.  Dropout is not applied (the probabilities before dropout, as
    ``mk.attention_scores``)."""
    offs_n = tl.arange(0, BLOCK_N)
    if SCORES == 1:
        w = tl.where(row_ok, 1.0, 0.0)
        run = True
    else:
        w = tl.load(SW + qb + rows, mask=row_ok, other=0.0)
        run = tl.sum((w != 0.0).to(tl.int32), 0) > 0
    if run:
        w = tl.where(l_i == 0.0, 0.0, w * score_w / tl.where(l_i == 0.0, 1.0, l_i))
        m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
        sc_base = SC + h * ssh + kb
        # transposed tiles Sᵀ = K Qᵀ [BLOCK_N, BLOCK_M]: the sum over the query rows runs along
        # the accumulator's rows (in-thread adds and one quad's shuffles, as the forward's row
        # sums) instead of across warps through shared memory (S's column sums: measured on
        # sm_90, d=80, 128×64: 522 instructions per key tile, 96 of them shuffles, 14 barriers)
        if SCORES == 2:
            # an unselected row (w = 0) that is NaN must add 0, not 0·NaN: its Q row is zeroed
            # once here rather than selected in every tile
            q0 = tl.where(w[:, None] != 0.0, q0, 0.0).to(q0.dtype)
            if D1 > 0:
                q1 = tl.where(w[:, None] != 0.0, q1, 0.0).to(q1.dtype)
        qT0 = tl.trans(q0)
        qT1 = qT0
        if D1 > 0:
            qT1 = tl.trans(q1)
        for phase in tl.static_range(2):  # interior key tiles with no bounds / causal select, then the edge
            lo_n, hi_n = _phase_range(phase, 0, mid, hi)
            for start_n in range(lo_n, hi_n, BLOCK_N):
                cols = start_n + offs_n
                if phase == 0:
                    col_ok = offs_n < BLOCK_N  # constant true
                else:
                    col_ok = cols < LK
                k0, k1 = _load_rows2(k_base, cols, col_ok, skn, skd, HEAD_DIM, D0, D1, ALIGNED)
                sT = _dot_chunks(k0, k1, qT0, qT1, D1, PREC, UPCAST)
                sT = _tile_logits(sT, rows_c[None, :], cols[:, None], col_ok[:, None],
                                  col_ok[:, None] & row_ok[None, :], mask_base, smm, smn, qk_scale, MASK_KIND,
                                  PRESCALE, phase == 1, True, IS_CAUSAL)
                pT = tl.math.exp2(sT * scale - m_shift[None, :]) * w[None, :]
                tl.atomic_add(sc_base + cols, tl.sum(pT, 1), mask=col_ok)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit
def _dkdv_body(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, KSPAN, SEED,
    qb, kb, seq, hk, out_bhk, cols, col_ok, n_start, LQ, LK, H, HKV, GROUP, STAT_L,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    smb, smh, smm, smn,
    qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, VARLEN: tl.constexpr,
):
    """dK, dV of BLOCK_N keys ``cols`` = n_start + [0, BLOCK_N) of sequence ``seq`` (dense: the
    batch row) and kv head ``hk``, computed on transposed tiles: Sᵀ = K Qᵀ and dPᵀ = V dOᵀ are
    [BLOCK_N, BLOCK_M] and dV += P̃ᵀ dO, dK += dSᵀ Q keep BLOCK_N rows, so every product of the
    loop has BLOCK_N (≥ 64) rows — Hopper's wgmma needs 64-row warpgroup tiles, and the
    untransposed form (S = Q Kᵀ with 32 query rows) ran half its FLOPs on mma.sync.  Loops over
    the GROUP query heads of the kv head (GQA), then the query blocks: [lo, band) masked
    (causal band, :func:`_query_range`), [band, LQ) mask-free.  Rows as in :func:`_fwd_body`
    (qb, kb: the sequence's batch index or first token).  dK/dV written contiguous: dense
    (B, Hkv, LK, D) at row ``out_bhk``·LK, packed (total_k, Hkv, D).

    No key bounds: a padding key (cols >= LK) only reaches its own dK/dV row, never stored.
    Out-of-range query rows: m = +inf, so P = 0 (no query mask needed)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    k_base = K + kb * skb + hk * skh
    v_base = V + kb * svb + hk * svh

    k0, k1 = _load_rows2(k_base, cols, col_ok, skn, skd, HEAD_DIM, D0, D1, ALIGNED)
    v0, v1 = _load_rows2(v_base, cols, col_ok, svn, svd, HEAD_DIM, D0, D1, ALIGNED)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    seed0 = 0
    if HAS_DROPOUT:
        seed0 = tl.load(SEED)

    off = LK - LQ  # packed: bottom-right causal alignment, query row i sees key j iff j <= i + off
    lo, band = _query_range(n_start, LQ, LK, BLOCK_M, BLOCK_N, IS_CAUSAL, VARLEN)
    q_end = LQ
    kmask = None
    if MASK_KIND >= 3:
        # a key-only mask: this program's keys' mask, read once; a block past the last kept key
        # of its batch row visits no query (its dK, dV are 0)
        kmask = _key_mask(MASK + qb * smb, cols[:, None], col_ok[:, None], smn, qk_scale, MASK_KIND, PRESCALE)
        q_end = tl.where(n_start < tl.load(KSPAN + qb * 2), LQ, 0)
        lo = tl.minimum(lo, q_end)
        band = tl.minimum(band, q_end)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = seq.to(tl.int64) * H + h  # the Philox stream of (sequence or batch, head h)
        q_base = Q + qb * sqb + h * sqh
        do_base = DO + qb * sdb + h * sdh
        mask_base = MASK + qb * smb + h * smh
        if VARLEN:
            # packed statistics (H, 2, total_q) and delta (H, total_q): head rows, the sequence at qb
            stats = LSE + h * 2 * STAT_L + qb
            dl = DELTA + h * STAT_L + qb
        else:
            stats = LSE + bh * 2 * STAT_L
            dl = DELTA + bh * STAT_L
        seed = seed0 + bh * SEED_STRIDE  # the forward's Philox stream of head h (unused without dropout)
        if USE_TMA:
            qd0, qd1 = _row_descs(q_base, LQ, sqm, HEAD_DIM, BLOCK_M, D0, D1)
            dod0, dod1 = _row_descs(do_base, LQ, sdm, HEAD_DIM, BLOCK_M, D0, D1)
        for phase in tl.static_range(2):
            lo_m, hi_m = _phase_range(phase, lo, band, q_end)
            for start_m in range(lo_m, hi_m, BLOCK_M):
                rows = start_m + offs_m
                row_ok = rows < LQ
                if USE_TMA:
                    qT0, qT1 = _tma_cols2(qd0, qd1, start_m, D0, D1)
                else:
                    qT0, qT1 = _load_cols2(q_base, rows, row_ok, sqm, sqd, HEAD_DIM, D0, D1, ALIGNED)
                if USE_TMA:
                    do0, do1 = _tma_rows2(dod0, dod1, start_m, D0, D1)
                else:
                    do0, do1 = _load_rows2(do_base, rows, row_ok, sdm, sdd, HEAD_DIM, D0, D1, ALIGNED)
                m_row = tl.load(stats + rows, mask=row_ok, other=float("inf"))
                log2l = tl.load(stats + STAT_L + rows, mask=row_ok, other=0.0)
                delta = tl.load(dl + rows, mask=row_ok, other=0.0)
                sT = _dot_chunks(k0, k1, qT0, qT1, D1, PREC, UPCAST)
                dpT = _dot_chunks(v0, v1, tl.trans(do0), tl.trans(do1), D1, PREC, UPCAST)
                if VARLEN:
                    rows_c = rows + off  # the causal (and dropout) row index
                else:
                    rows_c = rows
                ld_ok = col_ok[:, None] & row_ok[None, :]
                pdT, dsT = _bwd_scores(sT, dpT, rows_c[None, :], cols[:, None], ld_ok, ld_ok, mask_base, smm, smn,
                                       qk_scale, m_row[None, :], log2l[None, :], delta[None, :], seed, LK, dropout_p,
                                       rows_c, n_start, MASK_KIND, PRESCALE, phase == 0, False, IS_CAUSAL,
                                       HAS_DROPOUT, BLOCK_N, True, kmask)
                pdT = pdT.to(DO.dtype.element_ty)
                dsT = dsT.to(Q.dtype.element_ty)
                dv0 += _dot(pdT, do0, PREC, UPCAST)
                dk0 += _dot(dsT, tl.trans(qT0), PREC, UPCAST)
                if D1 > 0:
                    dv1 += _dot(pdT, do1, PREC, UPCAST)
                    dk1 += _dot(dsT, tl.trans(qT1), PREC, UPCAST)

    if VARLEN:
        d_stride = HKV * HEAD_DIM
        dk_base = DK + kb * d_stride + hk * HEAD_DIM
        dv_base = DV + kb * d_stride + hk * HEAD_DIM
    else:
        d_stride = HEAD_DIM
        dk_base = DK + out_bhk.to(tl.int64) * LK * HEAD_DIM
        dv_base = DV + out_bhk.to(tl.int64) * LK * HEAD_DIM
    _store_rows(dk_base, dk0 * sm_scale, cols, col_ok, d_stride, offs_d0, 1, HEAD_DIM)
    _store_rows(dv_base, dv0, cols, col_ok, d_stride, offs_d0, 1, HEAD_DIM)
    if D1 > 0:
        _store_rows(dk_base, dk1 * sm_scale, cols, col_ok, d_stride, offs_d1, 1, HEAD_DIM)
        _store_rows(dv_base, dv1, cols, col_ok, d_stride, offs_d1, 1, HEAD_DIM)


@triton.jit
def _dq_body(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, KSPAN, SEED, DS,
    qb, kb, h, hk, stream, rows, rows_c, row_ok, m_start, LQ, LK, H, STAT_L,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdb, sdh, sdm, sdd,
    smb, smh, smm, smn,
    qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr, PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_GRAD: tl.constexpr, USE_TMA: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """dQ of query rows ``rows`` = m_start + [0, BLOCK_M) over keys [0, hi) (interior blocks
    [0, mid) first); rows, bases and ``stream`` as in :func:`_fwd_body` (dense: ``stream`` is
    also the (batch·H + head) row of the statistics, delta and dQ).  dQ written contiguous:
    dense (B, H, LQ, D), packed (total_q, H, D).

    The ragged key block is bounds-masked (BOUNDS): a zero padding key gets P = exp2(-m), which
    overflows when a row's logits are all below -128 (base 2), and inf·0 in dS·K is NaN.
    MASK_GRAD (dense): dS of the natural-log logits stored in DS (B, H, Lq, Lk) fp32."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    q_base = Q + qb * sqb + h * sqh
    do_base = DO + qb * sdb + h * sdh
    k_base = K + kb * skb + hk * skh
    v_base = V + kb * svb + hk * svh
    mask_base = MASK + qb * smb + h * smh

    q0, q1 = _load_rows2(q_base, rows, row_ok, sqm, sqd, HEAD_DIM, D0, D1, ALIGNED)
    do0, do1 = _load_rows2(do_base, rows, row_ok, sdm, sdd, HEAD_DIM, D0, D1, ALIGNED)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    if VARLEN:
        stats = LSE + h * 2 * STAT_L + qb  # packed statistics (H, 2, total_q), delta (H, total_q)
        dl = DELTA + h * STAT_L + qb
    else:
        stats = LSE + stream * 2 * STAT_L
        dl = DELTA + stream * STAT_L
    m_row = tl.load(stats + rows, mask=row_ok, other=float("inf"))[:, None]
    log2l = tl.load(stats + STAT_L + rows, mask=row_ok, other=0.0)[:, None]
    delta = tl.load(dl + rows, mask=row_ok, other=0.0)[:, None]
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(SEED) + stream * SEED_STRIDE

    hi, mid = _key_range(m_start, LQ, LK, KSPAN, qb, BLOCK_M, BLOCK_N, IS_CAUSAL, VARLEN, MASK_KIND)
    if USE_TMA:
        kd0, kd1 = _row_descs(k_base, LK, skn, HEAD_DIM, BLOCK_N, D0, D1)
        vd0, vd1 = _row_descs(v_base, LK, svn, HEAD_DIM, BLOCK_N, D0, D1)
    for phase in tl.static_range(2):
        lo_n, hi_n = _phase_range(phase, 0, mid, hi)
        for start_n in range(lo_n, hi_n, BLOCK_N):
            cols = start_n + offs_n
            if VARLEN and phase == 0:
                col_ok = offs_n < BLOCK_N  # constant true: the loads lose their predicates
            else:
                col_ok = cols < LK
            if USE_TMA:
                kT0, kT1 = _tma_cols2(kd0, kd1, start_n, D0, D1)
            else:
                kT0, kT1 = _load_cols2(k_base, cols, col_ok, skn, skd, HEAD_DIM, D0, D1, ALIGNED)
            if USE_TMA:
                vT0, vT1 = _tma_cols2(vd0, vd1, start_n, D0, D1)
            else:
                vT0, vT1 = _load_cols2(v_base, cols, col_ok, svn, svd, HEAD_DIM, D0, D1, ALIGNED)
            s = _dot_chunks(q0, q1, kT0, kT1, D1, PREC, UPCAST)
            dp = _dot_chunks(do0, do1, vT0, vT1, D1, PREC, UPCAST)
            _, ds = _bwd_scores(s, dp, rows_c[:, None], cols[None, :], col_ok[None, :],
                                row_ok[:, None] & col_ok[None, :], mask_base, smm, smn, qk_scale, m_row, log2l, delta,
                                seed, LK, dropout_p, rows_c, start_n, MASK_KIND, PRESCALE, phase == 1, True, IS_CAUSAL,
                                HAS_DROPOUT, BLOCK_N, False)
            if MASK_GRAD:
                # d(additive mask) = dS of the natural-log logits, full (B, H, Lq, Lk) fp32; the
                # launcher sums it over the mask's broadcast dims
                ds_ptrs = DS + stream * LQ * LK + rows[:, None].to(tl.int64) * LK + cols[None, :]
                tl.store(ds_ptrs, ds, mask=row_ok[:, None] & col_ok[None, :])
            ds = ds.to(Q.dtype.element_ty)
            dq0 += _dot(ds, tl.trans(kT0), PREC, UPCAST)
            if D1 > 0:
                dq1 += _dot(ds, tl.trans(kT1), PREC, UPCAST)
    if MASK_GRAD and IS_CAUSAL:
        # the key tiles skipped above the causal band, [cdiv(hi, BLOCK_N)·BLOCK_N, LK), get
        # dS = 0 (a position hidden by is_causal sends no gradient into the mask): DS comes
        # uninitialised, and zeros here cost one store per element, no memset of the whole buffer
        zero = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start_n in range((hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N, LK, BLOCK_N):
            cols = start_n + offs_n
            ds_ptrs = DS + stream * LQ * LK + rows[:, None].to(tl.int64) * LK + cols[None, :]
            tl.store(ds_ptrs, zero, mask=row_ok[:, None] & (cols < LK)[None, :])

    if VARLEN:
        dq_stride = H * HEAD_DIM
        dq_base = DQ + qb * dq_stride + h * HEAD_DIM
    else:
        dq_stride = HEAD_DIM
        dq_base = DQ + stream * LQ * HEAD_DIM
    _store_rows(dq_base, dq0 * sm_scale, rows, row_ok, dq_stride, offs_d0, 1, HEAD_DIM)
    if D1 > 0:
        _store_rows(dq_base, dq1 * sm_scale, rows, row_ok, dq_stride, offs_d1, 1, HEAD_DIM)
