"""Launchers of the FP8 (e4m3) attention forward, dense and packed: the kernels are the plain
forward entry points (``attention._attn_fwd``, ``attention_varlen._varlen_fwd``) with the
constexpr ``FP8`` of the shared body (:mod:`._fp8`); configurations are those of the bf16
forward pruned for 1-byte tiles (``_fits`` with itemsize 1; no TMA candidates).

Operands (views (B, H, L, D); packed: (total, H, D)): ``q8``, ``k8``, ``v8`` e4m3 (any strides;
the 16-byte row hint when rows are 16-byte aligned); ``desc`` fp32 (B·Hq, 3) / (Hq, 3) of
(q, k, v) descales per
query head (:func:`descale_rows`).  Output in ``out_dtype`` (bf16 by default upstream).
"""

from __future__ import annotations

import torch
import triton

from .._utils import new_output
from ._fp8 import aligned_bytes, split_head_dim_fp8
from ._launch import for_gpu, gpu_launcher

# (BLOCK_M, BLOCK_N, warps, stages) of the fp8 forward, best guess first: the bf16 forward's list
# less its 128-row tiles over 4 warps, which spilled in the sm_90 sweep of the fp8 forward
# (docs/inspect/fp8_sm90.md, triton 3.9: 128×64 over 4 warps 8-16 bytes at d=64, 128×32 over 4
# warps 48 bytes at d=72/88 causal); every kept candidate compiled with 0 spills and wgmma
# m64nNk32 e4m3 for both products at d=64/72/80/88/128, plain and causal.
_FP8_DENSE = [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 2)]
# packed: the grid is sized from BLOCK_M before the autotuner picks, so one BLOCK_M; the packed
# prologue's live state made 128×128 over 8 warps spill (qwen2-vl-packed d=80: 208 bytes, causal 88)
_FP8_PACKED = [(128, 64, 8, 3), (128, 32, 8, 3)]
_TUNE_KEY_DENSE = ["HEAD_DIM", "D0", "LK_BUCKET", "MASK_KIND", "IS_CAUSAL", "PRESCALE"]
_TUNE_KEY_PACKED = ["HEAD_DIM", "D0", "HEAD_BUCKET", "IS_CAUSAL", "PRESCALE"]


def _configs(cands):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in cands]


def _dense_candidates(d: int, has_mask: bool) -> list:
    """The dense list pruned, with a per-score user mask (one more live [BLOCK_M, BLOCK_N] tile), by
    the bf16 forward's rule (``attention._fits`` / ``_extra_state``: measured there, a bool mask
    alone made the 128×128 forward spill 1.9 KB); never empty."""
    from .attention import _extra_state, _fits

    if not has_mask:
        return _FP8_DENSE
    d0, d1 = split_head_dim_fp8(d)
    kept = [c for c in _FP8_DENSE if _fits("fwd", *c, d0 + d1, 1, False, *_extra_state("fwd", c[0], c[1], c[2], True))]
    return kept or [_FP8_DENSE[-1]]


def _launcher(kind: str, device_type: str, d: int, has_mask: bool = False):
    """(kernel, launch kwargs) of the fp8 forward: the interpreter's tiles of the bf16 kernels, or
    on a GPU the fp8 candidates (autotuned, or the first with ``MMKERNELS_AUTOTUNE=0``)."""
    from . import attention as A
    from . import attention_varlen as V

    if kind == "dense":
        if not for_gpu(device_type):
            return A._attn_fwd, dict(A._INTERP_FWD)
        return gpu_launcher(A._attn_fwd, lambda: _configs(_dense_candidates(d, has_mask)), _TUNE_KEY_DENSE,
                            ("attention_fp8", kind, d, has_mask))
    if not for_gpu(device_type):
        return V._varlen_fwd, dict(V._INTERP["fwd"])
    return gpu_launcher(V._varlen_fwd, lambda: _configs(_FP8_PACKED), _TUNE_KEY_PACKED, ("attention_fp8", kind, d))


def descale_rows(q_desc: torch.Tensor, k_desc: torch.Tensor, v_desc: torch.Tensor, lead: tuple) -> torch.Tensor:
    """(prod(lead)·Hq, 3) fp32 contiguous: q descales (lead..., Hq), k and v (lead..., Hkv),
    the kv ones repeated over their query heads (GQA).  Device ops only."""
    hq, hkv = q_desc.shape[-1], k_desc.shape[-1]
    if hkv != hq:
        k_desc = k_desc.repeat_interleave(hq // hkv, dim=-1)
        v_desc = v_desc.repeat_interleave(hq // hkv, dim=-1)
    return torch.stack([q_desc, k_desc, v_desc], dim=-1).reshape(-1, 3).to(torch.float32).contiguous()


def attention_forward_fp8(q8, k8, v8, desc, attn_mask, is_causal, scale, out_dtype):
    """Dense e4m3 forward; returns O (B, H, Lq, D) in ``out_dtype``."""
    from .attention import _common, _lk_bucket

    b, h, hkv, lq, lk, mask, kspan, mstr, seed_arg, meta = _common(q8, k8, attn_mask, 0.0, is_causal, scale, None)
    d = q8.shape[-1]
    d0, d1 = split_head_dim_fp8(d)
    meta.update(D0=d0, D1=d1, UPCAST=False, ALIGNED=aligned_bytes(q8, k8, v8))
    out = new_output((b, h, lq, d), out_dtype, q8.device)
    lse = new_output((b, h, 2, lq), torch.float32, q8.device)
    kernel, cfg = _launcher("dense", q8.device.type, d, has_mask=meta["MASK_KIND"] in (1, 2))
    grid = lambda META: (triton.cdiv(lq, META["BLOCK_M"]), b * h)  # noqa: E731
    kernel[grid](
        q8, k8, v8, out, lse, mask, kspan, seed_arg,
        *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(), *mstr,
        h, lq, lk, h // hkv, _lk_bucket(lk),
        float(scale) * 1.4426950408889634, 0.0,
        **meta, **cfg, DESC=desc, FP8=True,
    )
    return out


def varlen_forward_fp8(q8, k8, v8, desc, cu_q, cu_k, max_q, max_k, is_causal, scale, out_dtype, out=None):
    """Packed e4m3 forward; returns O (total_q, Hq, D) in ``out_dtype`` (``out`` when given)."""
    from .attention_varlen import _SCAN, _closed, _common, _head_bucket, _safe_metadata, grid_size, tile_map

    total_q, h, d = q8.shape
    total_k, hkv = k8.shape[0], k8.shape[1]
    cu_q, cu_k = _safe_metadata(cu_q, cu_k, total_q, total_k)
    n = cu_q.shape[0] - 1
    if out is None:
        out = new_output((total_q, h, d), out_dtype, q8.device)
    if total_q == 0 or n == 0:
        return out
    if total_k == 0:
        return out.zero_()
    seed_arg, meta = _common(q8, None, 0.0, is_causal, scale)
    d0, d1 = split_head_dim_fp8(d)
    heads_first = [t.transpose(0, 1).unsqueeze(0) for t in (q8, k8, v8)]
    meta.update(D0=d0, D1=d1, UPCAST=False, ALIGNED=aligned_bytes(*heads_first))
    lse = new_output((h, 2, total_q), torch.float32, q8.device)
    kernel, cfg = _launcher("packed", q8.device.type, d)
    bm = cfg.get("BLOCK_M", _FP8_PACKED[0][0])
    cu_k = _closed(cu_k)
    programs, per_seq = grid_size(n, total_q, bm, max_q)
    tmap, use_map = tile_map(cu_q, bm, programs, per_seq)
    kernel[(programs, h)](
        q8, k8, v8, out, lse, cu_q, cu_k, seed_arg, tmap, None, None,
        *q8.stride(), *k8.stride(), *v8.stride(), *out.stride(),
        h, total_q, h // hkv, n, per_seq, _head_bucket(d),
        float(scale) * 1.4426950408889634, 0.0, 0, 1.0,
        **meta, SCAN=_SCAN, USE_MAP=use_map, SCORES=0, **cfg, DESC=desc, FP8=True,
    )
    return out
