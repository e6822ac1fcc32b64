"""Packed (variable-length) flash attention in Triton: forward, backward, launchers.

Layout of ``flash_attn_varlen_func``: query (total_q, Hq, D), key/value (total_k, Hkv, D), with
int32 prefix sums ``cu_seqlens_q`` / ``cu_seqlens_k`` (n+1,) on the device.  Sequence s of the
query (rows cu_q[s]:cu_q[s+1]) attends only to sequence s of the keys.

No host synchronisation.  The launch grid comes from shapes alone: a sequence of Lq rows needs
ceil(Lq / BLOCK_M) query tiles, and sum_s ceil(Lq_s / BLOCK_M) <= ceil(total_q / BLOCK_M) + n, so
``cdiv(total_q, BLOCK_M) + n`` programs per head always suffice.  Each program finds its
sequence and row block itself (:func:`_tile`: a vectorised prefix sum of the tile counts over
``cu_seqlens``, one 256-wide chunk per 256 sequences); programs past the last real tile return
at once.  No extra launch, no map tensor.  A ``max_seqlen`` hint shrinks the grid to
n * cdiv(max_seqlen, BLOCK_M) when that is smaller (then the lookup is a division); it is never
required.  The dK/dV kernel tiles the keys (BLOCK_N over total_k) the same way.

The kernel bodies — loads, two-phase loops, scores, epilogues — are those of
:mod:`mmkernels.kernels._attention_body`, shared with the dense kernels
(:mod:`mmkernels.kernels.attention`): the kernels here are the packed prologues (program id →
sequence and row block via :func:`_tile`, the sequence's first token as its row base) calling
the bodies with ``VARLEN=True`` (bottom-right causal; no user masks, mask gradient or TMA).  The
tile helpers are those of :mod:`mmkernels.kernels._tiles`, the rotary pre-pass and the final
un-rotation of dQ/dK those of :mod:`mmkernels.kernels._rotary` (imported, not copied).  As in
the dense kernels:

* each key loop runs in two phases: interior blocks (inside the sequence's keys and, causal,
  entirely visible to the tile's first row) with no bounds or causal select, then the edge
  blocks (the causal band and the sequence's ragged last block) with them
  (``_attention_body._key_range``);
  the dK/dV query loop likewise (masked band first, then the mask-free rest);
* the softmax scale is folded into the exp2's FMA (PRESCALE: pre-scaled logits when the scale
  is <= 0, which would flip the row max);
* dK/dV works on transposed [BLOCK_N, BLOCK_M] tiles (Sᵀ = K Qᵀ), so all its products have
  BLOCK_N >= 64 rows and run on wgmma on sm_90;
* the dQ kernel bounds-masks the ragged key block (a zero padding key would get P = exp2(-m),
  inf when a row's logits are all very negative); dK/dV need not (a padding key only reaches
  its own, unstored, dK/dV row); out-of-range queries are harmless (m = +inf: P = 0).

Causal masking is bottom-right aligned (flash-attn's varlen convention): row i of a sequence
with Lq queries and Lk keys sees key j iff j <= i + (Lk - Lq).  It is implemented by passing the
shifted row index i + (Lk - Lq) to the shared top-left causal test (the dropout counter uses the
same shifted index in the forward and the backward, so the mask replays).

Dropout: Philox keyed by seed + (sequence·H + head)·1000003, counter row·Lk + col (local
indices), as the dense kernels key by (batch·H + head).

Launches: forward 1 Triton kernel; backward 3 (delta, dK/dV, dQ).  With rotary: 2 more in the
forward (Q and K rotated once into contiguous copies the loops read as plain operands) and 4 more
in the backward (the copies recomputed, then dQ and dK rotated back).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import interpreting, new_output, safe_cu_seqlens
from ._attention_body import _dkdv_body, _dq_body, _fwd_body
from ._launch import for_gpu, gpu_launcher
from ._rotary import rotated_copies, unrotate_grad
from ._tiles import (
    _aligned,
    _dot_precision,
    split_head_dim,
)
from .attention import (
    _attn_bwd_preprocess,
)


# --------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _tile(CU, TILE_MAP, pid, N_SEQS, PER_SEQ, BLOCK: tl.constexpr, SCAN: tl.constexpr, USE_MAP: tl.constexpr):
    """(sequence, first local row, sequence start, sequence length) of program ``pid``; length 0
    for a program past the packing's last tile (it returns).

    PER_SEQ > 0 (a max_seqlen hint): program t owns block t % PER_SEQ of sequence t // PER_SEQ,
    except that the last sequence (the padding tail) owns all programs from its first on.
    Otherwise sequence s owns programs [P_{s-1}, P_s) with P_s = sum_{r<=s} ceil(L_r / BLOCK):
    the sequence of t is the number of s with P_s <= t, found by scanning cu_seqlens in SCAN-wide
    vector chunks (one chunk up to SCAN sequences: ~207 windows of a 1000x2500 px Qwen2.5-VL image).
    USE_MAP (more than SCAN sequences, no hint): that scan would cost every program O(n), the
    whole grid O(n²), so the launcher computes the (sequence, block) of each program with three
    device ops (:func:`tile_map`) and the program reads its two entries.
    """
    seq = pid * 0
    first = pid * 0
    if USE_MAP:
        seq = tl.load(TILE_MAP + pid)
        first = pid - tl.load(TILE_MAP + tl.num_programs(0) + pid)
    elif PER_SEQ > 0:
        # the last sequence (rows past the caller's last boundary) is not bounded by the hint:
        # it owns every program from its first on (the launcher adds cdiv(total, BLOCK) of them)
        seq = tl.minimum(pid // PER_SEQ, N_SEQS - 1)
        first = seq * PER_SEQ
    else:
        before = pid * 0
        for c in range(0, N_SEQS, SCAN):
            idx = c + tl.arange(0, SCAN)
            ok = idx < N_SEQS
            lens = tl.load(CU + idx + 1, mask=ok, other=0) - tl.load(CU + idx, mask=ok, other=0)
            ntiles = (lens + (BLOCK - 1)) // BLOCK
            done = ok & ((tl.cumsum(ntiles, 0) + before) <= pid)  # sequences wholly before pid
            seq += tl.sum(done.to(tl.int32), 0)
            first += tl.sum(tl.where(done, ntiles, 0), 0)
            before += tl.sum(ntiles, 0)
    start = (pid - first) * BLOCK
    idle = seq >= N_SEQS
    seq = tl.minimum(seq, N_SEQS - 1)  # an idle program must not read past cu_seqlens
    lo = tl.load(CU + seq)
    length = tl.load(CU + seq + 1) - lo
    length = tl.where(idle, 0, length)
    return seq, start, lo.to(tl.int64), length


# --------------------------------------------------------------------------------------
# forward (the bodies: ``_attention_body``, shared with the dense kernels)
# --------------------------------------------------------------------------------------
@triton.jit
def _varlen_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K, SEED, TILE_MAP, SC, SW,
    sqt, sqh, sqd,
    skt, skh, skd,
    svt, svh, svd,
    sot, soh, sod,
    H, TOTAL_Q, GROUP, N_SEQS, PER_SEQ, HEAD_BUCKET,
    qk_scale, dropout_p, ssh, score_w,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, SCAN: tl.constexpr, USE_MAP: tl.constexpr, ALIGNED: tl.constexpr,
    PRESCALE: tl.constexpr, SCORES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DESC=None, FP8: tl.constexpr = False,
):
    """Program (query tile of the packing, head): the sequence and row block from :func:`_tile`.
    SCORES > 0: key importance added into SC (``_attention_body._scores_epilogue``); SC / SW are
    None when off (the plain kernel).  FP8: the e4m3 forward (:mod:`._fp8`)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq, m_start, q_lo, LQ = _tile(CU_Q, TILE_MAP, pid, N_SEQS, PER_SEQ, BLOCK_M, SCAN, USE_MAP)
    if m_start >= LQ:
        return  # past the last tile of the packing (the grid is an upper bound)
    k_lo = tl.load(CU_K + seq).to(tl.int64)
    LK = tl.load(CU_K + seq + 1) - k_lo
    hk = h // GROUP
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    rows_c = rows + (LK - LQ)  # bottom-right causal alignment (also the dropout row index)
    # strides: the token stride is both the sequence's (its first token q_lo / k_lo) and the row's
    _fwd_body(Q, K, V, O, LSE, Q, Q, SEED, q_lo, k_lo, h, hk, seq.to(tl.int64) * H + h, rows, rows_c, row_ok, m_start,
              LQ, LK, TOTAL_Q, h,
              sqt, sqh, sqt, sqd, skt, skh, skt, skd, svt, svh, svt, svd, sot, soh, sot, sod, 0, 0, 0, 0,
              qk_scale, dropout_p, HEAD_DIM, D0, D1, 0, IS_CAUSAL, HAS_DROPOUT, PREC, UPCAST, ALIGNED, PRESCALE,
              BLOCK_M, BLOCK_N, False, True, DESC, FP8, SC, SW, ssh, score_w, SCORES)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------
@triton.jit
def _varlen_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, SEED, TILE_MAP,
    sqt, sqh, sqd,
    skt, skh, skd,
    svt, svh, svd,
    sdt, sdh, sdd,
    H, HKV, TOTAL_Q, GROUP, N_SEQS, PER_SEQ, HEAD_BUCKET,
    qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, SCAN: tl.constexpr, USE_MAP: tl.constexpr, ALIGNED: tl.constexpr,
    PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (key tile of the packing, kv head): dK, dV of BLOCK_N keys of one sequence on
    transposed tiles (``_attention_body._dkdv_body``, as the dense ``_attn_bwd_dkdv``); dK, dV
    written contiguous (total_k, Hkv, D).  No key bounds in the loop: a padding key only reaches
    its own dK/dV row, never stored."""
    pid = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    seq, n_start, k_lo, LK = _tile(CU_K, TILE_MAP, pid, N_SEQS, PER_SEQ, BLOCK_N, SCAN, USE_MAP)
    if n_start >= LK:
        return
    q_lo = tl.load(CU_Q + seq).to(tl.int64)
    LQ = tl.load(CU_Q + seq + 1) - q_lo
    cols = n_start + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    _dkdv_body(Q, K, V, DO, LSE, DELTA, DK, DV, Q, Q, SEED, q_lo, k_lo, seq, hk, 0, cols, col_ok, n_start,
               LQ, LK, H, HKV, GROUP, TOTAL_Q,
               sqt, sqh, sqt, sqd, skt, skh, skt, skd, svt, svh, svt, svd, sdt, sdh, sdt, sdd, 0, 0, 0, 0,
               qk_scale, sm_scale, dropout_p, HEAD_DIM, D0, D1, 0, IS_CAUSAL, HAS_DROPOUT, PREC, UPCAST, ALIGNED,
               PRESCALE, BLOCK_M, BLOCK_N, False, True)


@triton.jit
def _varlen_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, SEED, TILE_MAP,
    sqt, sqh, sqd,
    skt, skh, skd,
    svt, svh, svd,
    sdt, sdh, sdd,
    H, TOTAL_Q, GROUP, N_SEQS, PER_SEQ, HEAD_BUCKET,
    qk_scale, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, SCAN: tl.constexpr, USE_MAP: tl.constexpr, ALIGNED: tl.constexpr,
    PRESCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (query tile of the packing, head): dQ of one sequence's row block
    (``_attention_body._dq_body``, which bounds-masks the ragged key block: a zero padding key
    gets P = exp2(-m), which overflows when a row's logits are all below -128, and inf·0 in dS·K
    is NaN); dQ written contiguous (total_q, H, D)."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    seq, m_start, q_lo, LQ = _tile(CU_Q, TILE_MAP, pid, N_SEQS, PER_SEQ, BLOCK_M, SCAN, USE_MAP)
    if m_start >= LQ:
        return
    k_lo = tl.load(CU_K + seq).to(tl.int64)
    LK = tl.load(CU_K + seq + 1) - k_lo
    hk = h // GROUP
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    _dq_body(Q, K, V, DO, LSE, DELTA, DQ, Q, Q, SEED, Q, q_lo, k_lo, h, hk, seq.to(tl.int64) * H + h,
             rows, rows + (LK - LQ), row_ok, m_start, LQ, LK, H, TOTAL_Q,
             sqt, sqh, sqt, sqd, skt, skh, skt, skd, svt, svh, svt, svd, sdt, sdh, sdt, sdd, 0, 0, 0, 0,
             qk_scale, sm_scale, dropout_p, HEAD_DIM, D0, D1, 0, IS_CAUSAL, HAS_DROPOUT, PREC, UPCAST, ALIGNED,
             PRESCALE, BLOCK_M, BLOCK_N, False, False, True)


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
_SCAN = 256  # sequences per vector chunk of the in-kernel tile lookup


def grid_size(n: int, total: int, block: int, max_seqlen: int | None) -> tuple[int, int]:
    """(programs per head, PER_SEQ) from shapes only, for ``n`` sequences of which the last is
    the padding tail (:func:`_safe_metadata`): cdiv(total, block) + n programs (each sequence
    needs ceil(L / block) <= L / block + 1 of them), or with a ``max_seqlen`` hint (an upper
    bound of every length but the tail's) (n - 1) * cdiv(max_seqlen, block) for the sequences
    plus cdiv(total, block) for the tail, which the hint does not bound (PER_SEQ > 0).  The hint
    is taken when that grid is no larger, or at most twice as large where it spares the
    launcher the tile map (more than ``_SCAN`` sequences): its programs find their sequence with
    one division; the tail's programs past a short (usually empty) tail return at once."""
    bound = triton.cdiv(total, block) + n
    if max_seqlen:
        per_seq = triton.cdiv(max_seqlen, block)
        hinted = (n - 1) * per_seq + triton.cdiv(total, block)
        if hinted <= bound or (n > _SCAN and hinted <= 2 * bound):
            return hinted, per_seq
    return bound, 0


def _common(query, seed, dropout_p, is_causal, scale):
    d = query.shape[-1]
    d0, d1 = split_head_dim(d)
    has_dropout = dropout_p > 0.0
    if has_dropout and seed is None:
        raise ValueError("seed: dropout_p > 0 needs a seed tensor")
    meta = dict(
        HEAD_DIM=d, D0=d0, D1=d1, IS_CAUSAL=bool(is_causal), HAS_DROPOUT=has_dropout,
        PREC=_dot_precision(query.dtype), UPCAST=interpreting() and query.dtype == torch.bfloat16,
        # the scale is folded into the exp2's FMA unless a scale <= 0 would flip the row max
        PRESCALE=not float(scale) > 0.0,
    )
    return (seed if has_dropout else query), meta


def _heads_first(x):
    """(total, H, D) viewed as (1, H, total, D): the packed row is the rotary row."""
    return x.transpose(0, 1).unsqueeze(0)


def tile_map(cu: torch.Tensor, block: int, programs: int, per_seq: int) -> tuple[torch.Tensor, bool]:
    """(map, used): with more than ``_SCAN`` sequences and no ``max_seqlen`` hint, the int32
    (2, programs) map of each program's sequence (n when idle) and its first program, from
    device ops (no host read); otherwise ``cu`` itself as an unused placeholder.  Measured in the
    interpreter: 5,000 empty sequences took > 600 s with the in-kernel scan (every program
    scanning every sequence)."""
    n = cu.shape[0] - 1
    if per_seq > 0 or n <= _SCAN:
        return cu, False
    ntiles = (cu[1:] - cu[:-1] + (block - 1)) // block
    ends = torch.cumsum(ntiles, 0)
    pid = torch.arange(programs, device=cu.device, dtype=ends.dtype)
    seq = torch.searchsorted(ends, pid, right=True)
    first = (ends - ntiles)[seq.clamp(max=n - 1)]
    return torch.stack([seq, pid - first]).to(torch.int32).contiguous(), True


def _safe_metadata(cu_q, cu_k, total_q: int, total_k: int):
    """The kernels index with cu_seqlens unchecked, so they get copies that cannot point outside
    the packed tensors (clamped, non-decreasing, contiguous: two tiny device ops each, no host
    read) whatever the caller passed; valid values keep their meaning, plus one trailing
    sequence, the padding tail: the rows past the caller's last boundary (none for a packing
    that ends at the total).  The kernels treat that last sequence as padding: its query rows
    see no key (O = 0, dQ = 0) and its keys no query (dK = dV = 0): :func:`_closed`."""
    if cu_q.shape != cu_k.shape or cu_q.dim() != 1 or cu_q.shape[0] < 1:
        raise ValueError(f"cu_seqlens_q / cu_seqlens_k: expected two (n+1,) tensors, got shapes "
                         f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    return safe_cu_seqlens(cu_q, total_q), safe_cu_seqlens(cu_k, total_k)


def _closed(cu: torch.Tensor) -> torch.Tensor:
    """Safe metadata whose last sequence (the padding tail) is made empty: the side of the
    packing that the tail's rows of the *other* side must not see (forward, dQ: the keys, so
    the tail's query rows see none, O = dQ = 0; dK/dV: the queries, so the tail's keys get
    dK = dV = 0).  Done in the metadata, not in the kernels (a select there cost the d=80
    forward 24 bytes of spills on sm_90)."""
    return torch.cat([cu[:-1], cu[-2:-1]])


def _head_bucket(d: int) -> int:
    return 64 if d <= 64 else (128 if d <= 128 else 256)


def varlen_forward(query, key, value, cu_q, cu_k, cos, sin, seed, max_q, max_k, dropout_p, is_causal, scale,
                   out=None, scores=None):
    """Launch the forward.  Returns O (total_q, Hq, D) and the softmax statistics (Hq, 2,
    total_q) fp32 (row max and log2 row sum of the base-2 logits, as the dense kernel; +inf max
    for rows with no visible key).  O is ``out`` when given (any strides, written in place:
    the caller's buffer of a CUDA graph), else a new contiguous tensor.

    ``scores``: None (the plain kernel), or ``(row_weights, reduce_heads)`` with row_weights None
    (every row, weight 1) or (total_q,) fp32 per-row weights (0 = not selected; the padding
    tail's rows must be 0) and reduce_heads "mean" / "sum" / None: then returns (O, statistics,
    scores), scores fp32 (total_k,) or (Hq, total_k) accumulated by the same kernel
    (``_attention_body._scores_epilogue``; zero for keys no selected row sees)."""
    total_q, h, d = query.shape
    total_k, hkv = key.shape[0], key.shape[1]
    cu_q, cu_k = _safe_metadata(cu_q, cu_k, total_q, total_k)
    n = cu_q.shape[0] - 1
    if out is None:
        out = new_output((total_q, h, value.shape[-1]), query.dtype, query.device)
    lse = new_output((h, 2, total_q), torch.float32, query.device)
    sc = sw = None
    score_args = dict(SC=None, SW=None, ssh=0, score_w=1.0, SCORES=0)
    if scores is not None:
        row_weights, reduce_heads = scores
        sc = torch.zeros((h if reduce_heads is None else 1, total_k), dtype=torch.float32, device=query.device)
        score_args = dict(SC=sc, SW=None, ssh=total_k if reduce_heads is None else 0,
                          score_w=1.0 / h if reduce_heads == "mean" else 1.0, SCORES=1)
        if row_weights is not None:
            sw = row_weights.to(device=query.device, dtype=torch.float32).contiguous()
            score_args.update(SW=sw, SCORES=2)

    def result():
        if scores is None:
            return out, lse
        return out, lse, (sc[0] if scores[1] is not None else sc)

    if total_q == 0 or n == 0:
        return result()
    if total_k == 0:  # every sequence has no key: rows attend to nothing
        out.zero_()
        lse[:, 0].fill_(float("inf"))
        lse[:, 1].zero_()
        return result()
    if cos is not None:
        query, key, _ = rotated_copies(query, key, cos, sin, _heads_first)
    seed_arg, meta = _common(query, seed, dropout_p, is_causal, scale)
    kernel, cfg, bm = _launcher("fwd", query.device.type, d, query.dtype, meta, score_args["SCORES"])
    cu_k = _closed(cu_k)
    programs, per_seq = grid_size(n, total_q, bm, max_q)
    tmap, use_map = tile_map(cu_q, bm, programs, per_seq)
    kernel[(programs, h)](
        query, key, value, out, lse, cu_q, cu_k, seed_arg, tmap, score_args["SC"], score_args["SW"],
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        h, total_q, h // hkv, n, per_seq, _head_bucket(d),
        float(scale) * 1.4426950408889634, float(dropout_p), score_args["ssh"], score_args["score_w"],
        **meta, SCAN=_SCAN, USE_MAP=use_map, ALIGNED=_aligned(query, key, value, out), SCORES=score_args["SCORES"],
        **cfg,
    )
    return result()


def varlen_backward(grad_out, query, key, value, out, lse, cu_q, cu_k, cos, sin, seed, max_q, max_k,
                    dropout_p, is_causal, scale):
    """Launch the backward; returns contiguous (dQ, dK, dV) shaped like the inputs (gradients
    of the un-rotated query and key when rotary is given)."""
    total_q, h, d = query.shape
    total_k, hkv = key.shape[0], key.shape[1]
    cu_q, cu_k = _safe_metadata(cu_q, cu_k, total_q, total_k)
    n = cu_q.shape[0] - 1
    dq = new_output((total_q, h, d), query.dtype, query.device)
    dk = new_output((total_k, hkv, d), key.dtype, key.device)
    dv = new_output(tuple(value.shape), value.dtype, value.device)
    if n == 0 or total_q == 0 or total_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    rotation = None
    if cos is not None:
        query, key, rotation = rotated_copies(query, key, cos, sin, _heads_first)
    seed_arg, meta = _common(query, seed, dropout_p, is_causal, scale)
    delta = new_output((h, total_q), torch.float32, query.device)
    pre_m = 64
    # the dense preprocess kernel on a batch-1 view: (B=1, H, L=total_q, D)
    _attn_bwd_preprocess[(triton.cdiv(total_q, pre_m), h)](
        out, grad_out, delta, 0, out.stride(1), out.stride(0), out.stride(2),
        0, grad_out.stride(1), grad_out.stride(0), grad_out.stride(2), h, total_q,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=pre_m, ALIGNED=_aligned(out, grad_out),
    )
    common = (*query.stride(), *key.stride(), *value.stride(), *grad_out.stride())
    qk_scale = float(scale) * 1.4426950408889634
    kv_kernel, kv_cfg, bn = _launcher("dkdv", query.device.type, d, query.dtype, meta)
    programs, per_seq = grid_size(n, total_k, bn, max_k)
    tmap, use_map = tile_map(cu_k, bn, programs, per_seq)
    kv_kernel[(programs, hkv)](
        query, key, value, grad_out, lse, delta, dk, dv, _closed(cu_q), cu_k, seed_arg, tmap, *common,
        h, hkv, total_q, h // hkv, n, per_seq, _head_bucket(d), qk_scale, float(scale), float(dropout_p),
        **meta, SCAN=_SCAN, USE_MAP=use_map, ALIGNED=_aligned(query, key, value, grad_out), **kv_cfg,
    )
    q_kernel, q_cfg, bm = _launcher("dq", query.device.type, d, query.dtype, meta)
    programs, per_seq = grid_size(n, total_q, bm, max_q)
    tmap, use_map = tile_map(cu_q, bm, programs, per_seq)
    q_kernel[(programs, h)](
        query, key, value, grad_out, lse, delta, dq, cu_q, _closed(cu_k), seed_arg, tmap, *common,
        h, total_q, h // hkv, n, per_seq, _head_bucket(d), qk_scale, float(scale), float(dropout_p),
        **meta, SCAN=_SCAN, USE_MAP=use_map, ALIGNED=_aligned(query, key, value, grad_out), **q_cfg,
    )
    if rotation is not None:
        unrotate_grad(_heads_first(dq), *rotation)
        unrotate_grad(_heads_first(dk), *rotation)
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# configurations (built lazily: importing this module never queries a device)
# --------------------------------------------------------------------------------------
# Interpreter: few large tiles (each program runs in Python); BLOCK_M != BLOCK_N keeps the
# causal block-skipping arithmetic honest.
_INTERP = {"fwd": dict(BLOCK_M=64, BLOCK_N=32), "dkdv": dict(BLOCK_M=32, BLOCK_N=64),
           "dq": dict(BLOCK_M=64, BLOCK_N=32)}
_TUNE_KEY = ["HEAD_DIM", "D0", "HEAD_BUCKET", "IS_CAUSAL", "HAS_DROPOUT", "PREC", "PRESCALE"]


def _mapped(kind: str) -> str:
    """The block size the launch grid is built from: query rows (fwd, dQ) or keys (dK/dV)."""
    return "BLOCK_N" if kind == "dkdv" else "BLOCK_M"


# fp32 values per thread the packed kernels keep live beyond the dense kernels' estimate (the
# sequence lookup, per-sequence bases and lengths, the shifted causal rows), by (kernel, dropout).
# Calibrated on sm_90 bf16 compiles (``mmkernels inspect --kernel attention_varlen``): the
# forward at 128×128 over 8 warps spilled 24 bytes at d=88 (dense estimate 112 values) and
# 88 at d=128 (128), none at d=72 (104); 128×64 over 4 warps 16 bytes at d=64 (128).  With
# dropout the dense forward's own limit is already lower (120) and the packed forward at
# 128×32 over 8 warps kept 40+ registers free (d=80 with RoPE: 213).  dK/dV at 32×128 over 8
# warps spilled 64 bytes at d=128 causal (dense estimate 160), none at d=88 (128); with
# dropout it runs 32×64 tiles (no spill at d=64-128).  dQ spilled nothing the dense rule keeps.
_VARLEN_LIVE = {("fwd", False): 24.0, ("fwd", True): 0.0, ("dkdv", False): 16.0, ("dkdv", True): 0.0,
                ("dq", False): 0.0, ("dq", True): 0.0}
# what the forward's key-importance epilogue (SCORES > 0) keeps live on top: calibrated on sm_90
# bf16 compiles of the Qwen packing (``mmkernels inspect``-style, 128×128 over 8 warps): 16-32
# bytes of spills at d=80 (dense estimate 104 + 24 values), none at d=72 (100 + 24).  Above
# d=80 (D0 + D1 > 80) the scores variant runs 2 pipeline stages: 128×64 over 8 warps spilled 16
# bytes at d=88 with 3 stages, none with 2.
_SCORES_LIVE = 4.0
_SCORES_MAX_STAGES_ABOVE_D80 = 2


def _gpu_configs(kind: str, d: int, dtype: torch.dtype, has_dropout: bool = False, prec: str = "tf32",
                 scores: bool = False) -> list:
    """The dense kernels' candidates pruned by their rule (``attention._fits``: live fp32
    state per thread and staged bytes) with what the packed kernels keep on top:
    ``_VARLEN_LIVE`` (rotary runs as a pre-pass, so its calls take these same lists).  Then only
    the candidates sharing the first one's
    mapped block size are kept: the grid (programs per sequence) is sized before the
    autotuner picks, so only the other block size, warps and stages may vary.  The first is
    the untuned default (never none: the dense list's last if all fail).  fp32 under the
    "highest" matmul precision (``prec`` "ieee": FMA dots) takes the dense kernels' measured
    spill-free lists (``attention._CANDIDATES_IEEE``) instead of the rule."""
    from .attention import _CANDIDATES, _CANDIDATES_BIG, _CANDIDATES_IEEE, _fits, tf32_lists

    d0, d1 = split_head_dim(d)
    dp = d0 + d1
    mapped = 1 if kind == "dkdv" else 0  # index of the mapped block size in (BLOCK_M, BLOCK_N, ...)
    if prec == "ieee" and dtype == torch.float32:
        kept = next(c for limit, c in _CANDIDATES_IEEE[kind].items() if dp <= limit)
        kept = [c for c in kept if c[mapped] == kept[0][mapped]]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in kept]
    big = d > 128 or dtype == torch.float32
    cands = (_CANDIDATES_BIG if big else _CANDIDATES)[kind]
    itemsize = torch.empty((), dtype=dtype).element_size()

    def fits(bm, bn, warps, stages):
        extra = _VARLEN_LIVE[kind, has_dropout] + (_SCORES_LIVE if scores else 0.0)
        return _fits(kind, bm, bn, warps, stages, dp, itemsize, has_dropout, extra, 0)

    kept = [c for c in cands if fits(*c)] or [cands[-1]]
    if dtype == torch.float32:  # the measured TF32 lists (attention.tf32_lists)
        kept = tf32_lists(kind, dp, has_dropout, kept)
        if kind == "fwd":  # packed 64x64 over 4 warps: 8-48 bytes of spills at d=72-88 (triton 3.9)
            kept = [c for c in kept if c != (64, 64, 4, 2)] or kept
    kept = [c for c in kept if c[mapped] == kept[0][mapped]]
    if scores and dp > 80:
        kept = list(dict.fromkeys((bm, bn, w, min(st, _SCORES_MAX_STAGES_ABOVE_D80)) for bm, bn, w, st in kept))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in kept]


def _launcher(kind: str, device_type: str, d: int, dtype: torch.dtype, meta: dict, scores: int = 0):
    """(kernel, launch kwargs, mapped tile size).  ``scores`` (forward): the SCORES variant gets
    its own autotuner, which zeroes the scores buffer around its timed runs (they accumulate)."""
    if not for_gpu(device_type):
        cfg = _INTERP[kind]
        return _KERNELS[kind], cfg, cfg[_mapped(kind)]
    dropout, prec = meta["HAS_DROPOUT"], meta["PREC"]
    configs = _gpu_configs(kind, d, dtype, dropout, prec, bool(scores))
    if scores:
        kernel, cfg = gpu_launcher(_KERNELS[kind], lambda: configs, _TUNE_KEY + ["SCORES"],
                                   ("attention_varlen", kind, d, dtype, dropout, prec, "scores"), reset_to_zero=["SC"])
        return kernel, cfg, configs[0].kwargs[_mapped(kind)]
    kernel, cfg = gpu_launcher(_KERNELS[kind], lambda: configs, _TUNE_KEY,
                               ("attention_varlen", kind, d, dtype, dropout, prec))
    return kernel, cfg, configs[0].kwargs[_mapped(kind)]


_KERNELS = {"fwd": _varlen_fwd, "dkdv": _varlen_bwd_dkdv, "dq": _varlen_bwd_dq}
