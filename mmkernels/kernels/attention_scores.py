"""Attention scores in O(L) memory: the softmax mass each key receives from chosen query rows.

For query rows ``i`` in a selected set S (given as their row numbers, ``ROWS`` (B, n)) and each
key ``j``, ``out[b, h, j] = Σ_{i∈S} softmax(q_i Kᵀ·scale + mask_i)[j]``.  Two kernels, both
built from the forward's jit helpers (:mod:`mmkernels.kernels.attention`: tile loads with the
head-dim split, ``_logits`` with bounds / causal / bool or additive masks, the online-softmax
step and the statistics store), so masks and numerics match ``mk.attention`` exactly:

* ``_scores_stats`` (only when the caller has no statistics): one program per (block of
  selected rows, batch·head) streams the keys once and stores each row's base-2 max and log2
  sum — the forward without V;
* ``_scores_colsum``: one program per (block of keys, batch·head) loops over the selected rows,
  rebuilds P = exp2(s − max − log2 sum) for its [rows, keys] tile and adds the column sums in
  registers.  No atomics: each program owns its keys; each (b, h, key) is written once.

Memory: the (B, H, 2, n) statistics and the (B, H, Lk) fp32 output; the (n, Lk) probability
matrix only ever exists one [BLOCK_M, BLOCK_N] tile at a time.  Rows with no visible key carry
max = +inf (the forward's convention) and so contribute 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import interpreting, new_output
from ._launch import for_gpu, gpu_launcher
from ._tiles import (
    _aligned,
    _dot_precision,
    _finish_rows,
    _load_cols2,
    _load_rows2,
    _logits,
    _mask_args,
    _softmax_step,
    split_head_dim,
)


@triton.jit
def _load_selected(ROWS, b, srb, srn, sel, sel_ok):
    """Row numbers (into the query / mask) of selected rows ``sel``; padding lanes read row 0."""
    return tl.load(ROWS + b * srb + sel * srn, mask=sel_ok, other=0)


@triton.jit
def _scores_stats(
    Q, K, ROWS, STATS, MASK,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    srb, srn,
    smb, smh, smm, smn,
    H, N, LK, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    sel = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    sel_ok = sel < N
    rows = _load_selected(ROWS, b, srb, srn, sel, sel_ok)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    mask_base = MASK + b * smb + h * smh

    q0, q1 = _load_rows2(q_base, rows, sel_ok, sqm, sqd, HEAD_DIM, D0, D1, ALIGNED)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    hi = LK
    if IS_CAUSAL:
        # row i sees keys <= i: nothing right of the block's last selected row matters
        hi = tl.minimum(LK, tl.max(tl.where(sel_ok, rows, 0)) + 1)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kT0, kT1 = _load_cols2(k_base, cols, col_ok, skn, skd, HEAD_DIM, D0, D1, ALIGNED)
        s = _logits(q0, q1, kT0, kT1, rows, cols, sel_ok, col_ok, mask_base, smm, smn, qk_scale,
                    D1, MASK_KIND, IS_CAUSAL, PREC, UPCAST)
        _, _, m_i, l_i = _softmax_step(s, m_i, l_i)
    _finish_rows(STATS, pid_bh.to(tl.int64), N, sel, sel_ok, m_i, l_i, 0.0, False)


@triton.jit
def _scores_colsum(
    Q, K, ROWS, STATS, MASK, OUT,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    srb, srn,
    smb, smh, smm, smn,
    H, N, LK, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    bh = pid_bh.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < LK
    offs_m = tl.arange(0, BLOCK_M)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + hk * skh
    mask_base = MASK + b * smb + h * smh

    kT0, kT1 = _load_cols2(k_base, cols, col_ok, skn, skd, HEAD_DIM, D0, D1, ALIGNED)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        sel = start_m + offs_m
        sel_ok = sel < N
        rows = _load_selected(ROWS, b, srb, srn, sel, sel_ok)
        q0, q1 = _load_rows2(q_base, rows, sel_ok, sqm, sqd, HEAD_DIM, D0, D1, ALIGNED)
        s = _logits(q0, q1, kT0, kT1, rows, cols, sel_ok, col_ok, mask_base, smm, smn, qk_scale,
                    D1, MASK_KIND, IS_CAUSAL, PREC, UPCAST)
        m_row = tl.load(STATS + bh * 2 * N + sel, mask=sel_ok, other=float("inf"))
        log2l = tl.load(STATS + bh * 2 * N + N + sel, mask=sel_ok, other=0.0)
        # m = +inf (padding lane or a row with no visible key): every p is exp2(-inf) = 0
        p = tl.math.exp2((s - m_row[:, None]) - log2l[:, None])
        acc += tl.sum(p, 0)
    tl.store(OUT + bh * LK + cols, acc, mask=col_ok)


# --------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------
def _block_m(n: int) -> int:
    # tl.dot needs >= 16 rows; one selected row (FastV's last token, a CLS row) is the common case
    return 16 if n <= 16 else (32 if n <= 32 else 64)


def attention_scores(query, key, rows, stats, attn_mask, is_causal: bool, scale: float):
    """Per-head column sums (B, H, Lk) fp32 over the selected rows.

    ``rows`` (B, n) integer row numbers into ``query`` (already in [0, Lq)); ``stats`` None or
    (B, H, 2, n) fp32 contiguous, the forward's base-2 (row max, log2 row sum) of those rows in
    the selection's order; ``attn_mask`` bool / additive, broadcastable to (B, H, Lq, Lk).
    """
    b, h, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    n = rows.shape[1]
    d0, d1 = split_head_dim(d)
    mask, mask_kind, mstr = _mask_args(attn_mask, b, h, lq, lk, query)
    meta = dict(HEAD_DIM=d, D0=d0, D1=d1, MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal),
                PREC=_dot_precision(query.dtype), UPCAST=interpreting() and query.dtype == torch.bfloat16,
                ALIGNED=_aligned(query, key))
    qk_scale = float(scale) * 1.4426950408889634
    common = (*query.stride(), *key.stride(), *rows.stride())
    bm = _block_m(n)
    if stats is None:
        stats = new_output((b, h, 2, n), torch.float32, query.device)
        kernel, cfg = _launcher("stats", query.device.type, d, query.dtype, bm)
        grid = lambda META: (triton.cdiv(n, META["BLOCK_M"]), b * h)  # noqa: E731
        kernel[grid](query, key, rows, stats, mask, *common, *mstr, h, n, lk, h // hkv, qk_scale, **meta, **cfg)
    out = new_output((b, h, lk), torch.float32, query.device)
    kernel, cfg = _launcher("colsum", query.device.type, d, query.dtype, bm)
    grid = lambda META: (triton.cdiv(lk, META["BLOCK_N"]), b * h)  # noqa: E731
    kernel[grid](query, key, rows, stats, mask, out, *common, *mstr, h, n, lk, h // hkv, qk_scale, **meta, **cfg)
    return out


_TUNE_KEY = ["HEAD_DIM", "D0", "MASK_KIND", "IS_CAUSAL", "PREC"]  # BLOCK_M: one autotuner per value


def _gpu_configs(kind: str, d: int, dtype: torch.dtype, bm: int) -> list:
    """(BLOCK_N, warps, stages) candidates with BLOCK_M fixed by the number of selected rows.
    Not tuned on a GPU yet; fp32 / d > 128 tiles are kept narrower for registers.  The fp32
    stats tiles: sm_90 compiles under torch's "highest" precision (FMA dots), triton 3.6 and 3.9,
    d=80/128, plain and causal — 32 keys over 4 warps spilled 80-200 bytes at d=128 and 64 over
    8 warps 112-136 (causal); 32 over 8 warps and 16 over 4 spilled nothing."""
    big = d > 128 or dtype == torch.float32
    if kind == "stats":
        cands = [(64, 4, 2), (128, 4, 3), (32, 4, 2)] if not big else [(32, 8, 2), (16, 4, 2)]
    else:
        cands = [(128, 4, 2), (64, 4, 2), (256, 8, 2)] if not big else [(64, 4, 2), (32, 4, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bn, w, st in cands]


# the interpreter runs each program in Python: wide key tiles mean few programs
_INTERP = {"stats": dict(BLOCK_N=64), "colsum": dict(BLOCK_N=64)}
_KERNELS = {"stats": _scores_stats, "colsum": _scores_colsum}


def _launcher(kind: str, device_type: str, d: int, dtype: torch.dtype, bm: int):
    if not for_gpu(device_type):
        return _KERNELS[kind], dict(_INTERP[kind], BLOCK_M=bm)
    fn, cfg = gpu_launcher(_KERNELS[kind], lambda: _gpu_configs(kind, d, dtype, bm), _TUNE_KEY,
                           ("attention_scores", kind, d, dtype, bm))
    return fn, cfg
