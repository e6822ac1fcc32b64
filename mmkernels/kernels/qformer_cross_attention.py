"""Fused Q-Former cross-attention forward (BLIP-2 / InstructBLIP) in Triton.

One program per (query block, batch, head) — with the Q-Former's 32 queries, one block holds
every query of its (batch, head).  It projects its head's slice of Q from ``hidden_states``,
then streams the image tokens in BLOCK_N tiles: each tile of ``encoder_hidden_states`` is read
once per head and projected to K and V in registers (K = E·Wk_hᵀ + bk_h, V = E·Wv_hᵀ + bv_h,
the reduction over the 1408 image channels in BLOCK_K steps), followed by the online softmax
and PV of the attention forward.  K and V are never written to memory.

It stores O and the same per-row softmax statistics as :mod:`mmkernels.kernels.attention`
(base-2 row max and log2 row sum) with the same Philox dropout stream (seed + (b·H + h)·1000003,
counter = row·Lk + col), so the backward (:func:`qformer_backward`) is that kernel's backward
applied to Q, K and V recomputed with cuBLAS, then GEMMs for the input and weight gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._utils import interpreting, new_output
from ._launch import for_gpu, gpu_launcher
from ._tiles import (
    _aligned,
    _dot,
    _dot_precision,
    _dropout_keep,
    _finish_rows,
    _mask_args,
    _mask_logits,
    _softmax_step,
)
from .attention import (
    attention_backward,
    attention_forward,
)


@triton.jit
def _proj_tile(
    base, rows, row_ok, s_row, s_k, W, s_wo, s_wi, w_row0, offs_d, d_ok, KDIM,
    BLOCK_K: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr,
):
    """[rows, d] = X[rows, :] · W[w_row0 + d, :]ᵀ, reduced over KDIM in BLOCK_K steps (fp32).

    ALIGNED: the launcher checked that X's and W's rows start 16-byte aligned; pointer
    divisibility (bytes) is stated on the contiguous axis so the loads are 16-byte vectors and
    pipelined (attention.py ``_load_rows``)."""
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, KDIM, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < KDIM
        x_ptrs = base + rows[:, None] * s_row + kk[None, :] * s_k
        w_ptrs = W + (w_row0 + offs_d)[None, :] * s_wo + kk[:, None] * s_wi
        if ALIGNED:
            x_ptrs = tl.multiple_of(x_ptrs, [1, 16])
            w_ptrs = tl.multiple_of(w_ptrs, [16, 1])
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wT = tl.load(w_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += _dot(x, wT, PREC, UPCAST)
    return acc


@triton.jit
def _qformer_fwd(
    X, E, WQ, BQ, WK, BK, WV, BV, O, STATS, MASK, SEED,
    sxb, sxm, sxk,
    seb, sen, sek,
    swq_o, swq_i, swk_o, swk_i, swv_o, swv_i,
    sob, som,
    smb, smh, smm, smn,
    H, LQ, LK, DQ, DKV,
    qk_scale, dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < LQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    w_row0 = h * HEAD_DIM
    dtype = O.dtype.element_ty

    # Q_h = X · Wq_hᵀ + bq_h, rounded to the input dtype as nn.Linear's output would be
    q = _proj_tile(X + b * sxb, rows, row_ok, sxm, sxk, WQ, swq_o, swq_i, w_row0, offs_d, d_ok, DQ,
                   BLOCK_K, PREC, UPCAST, BLOCK_M, BLOCK_D, ALIGNED)
    q = (q + tl.load(BQ + w_row0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]).to(dtype)
    bk = tl.load(BK + w_row0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    bv = tl.load(BV + w_row0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    e_base = E + b * seb
    mask_base = MASK + b * smb + h.to(tl.int64) * smh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED) + pid_bh.to(tl.int64) * 1000003

    offs_k = tl.arange(0, BLOCK_K)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        # K and V of this tile share every load of the image features
        k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, DKV, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < DKV
            e_ptrs = e_base + cols[:, None] * sen + kk[None, :] * sek
            wk_ptrs = WK + (w_row0 + offs_d)[None, :] * swk_o + kk[:, None] * swk_i
            wv_ptrs = WV + (w_row0 + offs_d)[None, :] * swv_o + kk[:, None] * swv_i
            if ALIGNED:
                e_ptrs = tl.multiple_of(e_ptrs, [1, 16])
                wk_ptrs = tl.multiple_of(wk_ptrs, [16, 1])
                wv_ptrs = tl.multiple_of(wv_ptrs, [16, 1])
            e = tl.load(e_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            wkT = tl.load(wk_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            wvT = tl.load(wv_ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            k += _dot(e, wkT, PREC, UPCAST)
            v += _dot(e, wvT, PREC, UPCAST)
        k = (k + bk[None, :]).to(dtype)
        v = (v + bv[None, :]).to(dtype)

        s = _mask_logits(_dot(q, tl.trans(k), PREC, UPCAST) * qk_scale, rows, cols, row_ok, col_ok,
                         mask_base, smm, smn, MASK_KIND, False)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, rows, start_n, LK, dropout_p, BLOCK_N), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(dtype), v, PREC, UPCAST)

    inv_l = _finish_rows(STATS, pid_bh.to(tl.int64), LQ, rows, row_ok, m_i, l_i, dropout_p, HAS_DROPOUT)
    o_ptrs = O + b * sob + rows[:, None] * som + (w_row0 + offs_d)[None, :]
    tl.store(o_ptrs, (acc * inv_l[:, None]).to(dtype), mask=row_ok[:, None] & d_ok[None, :])


def _configs(dtype: torch.dtype, prec: str = "tf32") -> list:
    """Candidates for a GPU (not yet tuned on one); the first is the untuned default.  fp32 with
    "highest" precision (PREC "ieee": FMA dots, operands in registers) has its own list: the
    TF32 one spilled 200-460 bytes there on sm_90; these compiled spill-free (BLIP-2 shape, with
    and without mask + dropout)."""
    fp32 = dtype == torch.float32
    if fp32 and prec == "ieee":
        cands = [(32, 32, 8, 2), (16, 32, 4, 2)]
    elif fp32:  # TF32; (64, 64, 4, 2) and (32, 64, 4, 2) spilled 32-80 bytes on sm_90
        cands = [(64, 32, 4, 2), (64, 32, 8, 3)]
    else:
        cands = [(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st) for bn, bk, w, st in cands]


_TUNE_KEY = ["HEAD_DIM", "DKV", "MASK_KIND", "HAS_DROPOUT", "PREC", "BLOCK_M"]


def _kernel(device_type: str, dtype: torch.dtype, prec: str = "tf32"):
    if not for_gpu(device_type):
        # interpreter: big tiles are fewer Python-level steps
        return _qformer_fwd, dict(BLOCK_N=64, BLOCK_K=64)
    return gpu_launcher(_qformer_fwd, lambda: _configs(dtype, prec), _TUNE_KEY,
                        ("qformer_cross_attention", dtype, prec))


def qformer_forward(x, enc, wq, bq, wk, bk, wv, bv, mask, seed, num_heads, dropout_p, scale):
    """Launch the fused forward.

    x (B, Lq, Dq), enc (B or 1, Lk, Dkv) — batch 1 broadcasts —, weights (Dq, Dq)/(Dq, Dkv),
    biases (Dq,), mask None or an SDPA mask broadcastable to (B, H, Lq, Lk).
    Returns out (B, Lq, Dq) contiguous and the softmax statistics (B, H, 2, Lq) fp32.
    """
    bx, lq, dq = x.shape
    b = max(bx, enc.shape[0])
    lk, dkv = enc.shape[1], enc.shape[2]
    h = num_heads
    # the kernel reads the (Dq,) biases with unit stride: a strided / expanded view is copied
    bq, bk, bv = bq.contiguous(), bk.contiguous(), bv.contiguous()
    d = wq.shape[0] // h
    out = new_output((b, lq, wq.shape[0]), x.dtype, x.device)
    stats = new_output((b, h, 2, lq), torch.float32, x.device)
    m, mask_kind, mstr = _mask_args(mask, b, h, lq, lk, x)
    has_dropout = dropout_p > 0.0
    seb = 0 if enc.shape[0] == 1 else enc.stride(0)
    block_m = min(64, max(16, triton.next_power_of_2(lq)))
    kernel, cfg = _kernel(x.device.type, x.dtype, _dot_precision(x.dtype))
    kernel[(triton.cdiv(lq, block_m), b * h)](
        x, enc, wq, bq, wk, bk, wv, bv, out, stats, m, seed if has_dropout else x,
        0 if bx == 1 else x.stride(0), x.stride(1), x.stride(2),
        seb, enc.stride(1), enc.stride(2),
        wq.stride(0), wq.stride(1), wk.stride(0), wk.stride(1), wv.stride(0), wv.stride(1),
        out.stride(0), out.stride(1),
        *mstr,
        h, lq, lk, dq, dkv,
        float(scale) * 1.4426950408889634, float(dropout_p),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        MASK_KIND=mask_kind, HAS_DROPOUT=has_dropout, PREC=_dot_precision(x.dtype),
        UPCAST=interpreting() and x.dtype == torch.bfloat16, ALIGNED=_aligned(x, enc, wq, wk, wv),
        BLOCK_M=block_m, **cfg,
    )
    return out, stats


# --------------------------------------------------------------------------------------
# backward: cuBLAS recompute of Q/K/V, the attention backward kernels, GEMM weight grads
# --------------------------------------------------------------------------------------
def project_heads(x, enc, wq, bq, wk, bk, wv, bv, num_heads: int):
    """Q, K, V (B, H, L, d) as views of three cuBLAS projections, a batch of 1 on either side
    expanded over the other (the head width is explicit: ``view(..., -1)`` is ambiguous when a
    batch or length is 0)."""
    b = max(x.shape[0], enc.shape[0])
    d = wq.shape[0] // num_heads

    def heads(t):
        return t.view(t.shape[0], t.shape[1], num_heads, d).transpose(1, 2).expand(b, -1, -1, -1)

    return (heads(torch.nn.functional.linear(x, wq, bq)), heads(torch.nn.functional.linear(enc, wk, bk)),
            heads(torch.nn.functional.linear(enc, wv, bv)))


def qformer_backward(grad_out, x, enc, wq, bq, wk, bk, wv, bv, mask, seed, num_heads, dropout_p, scale):
    """Gradients (dx, denc, dWq, dbq, dWk, dbk, dWv, dbv) of the fused forward; a broadcast batch
    of 1 is summed back.

    Q, K, V are recomputed with cuBLAS and the attention forward is rerun on them (a small one:
    the Q-Former has 32 queries) rather than reusing the fused forward's O and statistics: the
    fused kernel sums each projection in its own order, so its bf16 V can differ from cuBLAS's by
    an ulp, and delta = rowsum(dO∘O) from that O against dP from the recomputed V leaves a
    spurious dS (measured: dx off by 0.028 in bf16 with a single image token, where the exact
    gradient is 0).  Recomputed together, the two agree exactly."""
    bx, lq, _ = x.shape
    be, lk, _ = enc.shape
    b, h, a = max(bx, be), num_heads, wq.shape[0]
    q, k, v = project_heads(x, enc, wq, bq, wk, bk, wv, bv, h)
    out, stats = attention_forward(q, k, v, mask, seed, dropout_p, False, scale)
    dq, dk, dv = attention_backward(grad_out.reshape(b, lq, h, a // h).transpose(1, 2), q, k, v, out, stats,
                                    mask, seed, dropout_p, False, scale)

    def rows(g, length, keep_batch):
        """(b, H, L, d) gradient → (rows, H·d), summed over a broadcast batch of 1."""
        g = g.transpose(1, 2).reshape(b, length, a)
        if keep_batch == 1 and b > 1:
            g = g.sum(0, keepdim=True)
        return g.reshape(-1, a)

    dq2, dk2, dv2 = rows(dq, lq, bx), rows(dk, lk, be), rows(dv, lk, be)
    x2, e2 = x.reshape(-1, x.shape[-1]), enc.reshape(-1, enc.shape[-1])
    dx = (dq2 @ wq).view(x.shape)
    de = torch.addmm(dk2 @ wk, dv2, wv).view(enc.shape)
    return dx, de, dq2.t() @ x2, dq2.sum(0), dk2.t() @ e2, dk2.sum(0), dv2.t() @ e2, dv2.sum(0)
