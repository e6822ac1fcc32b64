"""FP8 (e4m3) attention forward for inference: ``mk.attention(..., fp8=...)`` and
``mk.attention_varlen(..., fp8=...)`` (docs/fp8.md).

``fp8="dynamic"``: float16/bfloat16/float32 inputs quantised to e4m3 by a fused pre-pass (per
(batch, head) amax mapped to 448; packed: per head over the packing; rotary applied in the same
pass, before quantisation).  ``fp8=dict(q_descale=..., k_descale=..., v_descale=...)`` (or a
``(q, k, v)`` tuple): ``float8_e4m3fn`` inputs whose real values are ``x · descale``; descales
fp32 of shape () (per tensor) or (B, H) dense / (H,) packed (per head: H = Hq for q, Hkv for k
and v), as flash-attn 3's fp8 interface.

Layers: validation (``ValueError`` naming the argument) → support check (Triton backend only:
CUDA sm_89+ or the interpreter, d <= 256, Dv == D) → the forward-only ``torch.library`` ops
``mmkernels::attention_fp8_fwd`` / ``mmkernels::attention_varlen_fp8_fwd`` (fake registered, no
autograd: inference only).  Unsupported → one warning and the bf16 path on dequantised inputs
(or, with the Triton backend forced, an error).
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Optional

import torch

from .. import dispatch
from .._utils import describe, interpreting, triton_import_error

# the modules (``mmkernels.ops`` rebinds the names ``attention`` / ``attention_varlen`` to the functions)
dense = importlib.import_module(".attention", __package__)
packed_ops = importlib.import_module(".attention_varlen", __package__)

__all__ = ["parse_fp8", "attention_fp8", "attention_varlen_fp8"]

E4M3 = torch.float8_e4m3fn
_DYNAMIC_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_warned: set = set()


# --------------------------------------------------------------------------------------
# torch.library ops (forward only)
# --------------------------------------------------------------------------------------
def _quantised_dense(query, key, value, q_descale, k_descale, v_descale, cos, sin, dynamic):
    from ..kernels import _fp8

    if dynamic:
        q8, qd = _fp8.quantize_dynamic(query, cos, sin)
        k8, kd = _fp8.quantize_dynamic(key, cos, sin)
        v8, vd = _fp8.quantize_dynamic(value)
        b = query.shape[0]
        return q8, k8, v8, qd.view(b, -1), kd.view(b, -1), vd.view(b, -1)
    b, hq, hkv = query.shape[0], query.shape[1], key.shape[1]
    return (query, key, value, q_descale.expand(b, hq), k_descale.expand(b, hkv),
            v_descale.expand(b, hkv))


@torch.library.custom_op("mmkernels::attention_fp8_fwd", mutates_args=())
def _attention_fp8_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    q_descale: Optional[torch.Tensor],
    k_descale: Optional[torch.Tensor],
    v_descale: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
    dynamic: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dense (B, H, L, D) e4m3 forward; ``dynamic``: quantise (and rotate) here first."""
    from ..kernels import attention_fp8 as kernels

    q8, k8, v8, qd, kd, vd = _quantised_dense(query, key, value, q_descale, k_descale, v_descale, cos, sin,
                                             dynamic)
    desc = kernels.descale_rows(qd, kd, vd, (query.shape[0],))
    return kernels.attention_forward_fp8(q8, k8, v8, desc, attn_mask, is_causal, scale, out_dtype)


@_attention_fp8_fwd.register_fake
def _(query, key, value, attn_mask, q_descale, k_descale, v_descale, cos, sin, is_causal, scale, dynamic,
      out_dtype):
    b, h, lq, _ = query.shape
    return query.new_empty((b, h, lq, value.shape[-1]), dtype=out_dtype)


@torch.library.custom_op("mmkernels::attention_varlen_fp8_fwd", mutates_args=())
def _attention_varlen_fp8_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_descale: Optional[torch.Tensor],
    k_descale: Optional[torch.Tensor],
    v_descale: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    is_causal: bool,
    scale: float,
    dynamic: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Packed (total, H, D) e4m3 forward; ``dynamic``: quantise (and rotate) here first."""
    from ..kernels import attention_fp8 as kernels

    def heads_first(x):  # (total, H, D) -> (1, H, total, D): the packed row is the rotary row
        return x.transpose(0, 1).unsqueeze(0)

    def packed(x4):
        return x4[0].transpose(0, 1)

    q4, k4, v4, qd, kd, vd = _quantised_dense(heads_first(query), heads_first(key), heads_first(value),
                                             None if q_descale is None else q_descale.expand(1, query.shape[1]),
                                             None if k_descale is None else k_descale.expand(1, key.shape[1]),
                                             None if v_descale is None else v_descale.expand(1, key.shape[1]),
                                             cos, sin, dynamic)
    desc = kernels.descale_rows(qd[0], kd[0], vd[0], ())
    return kernels.varlen_forward_fp8(packed(q4), packed(k4), packed(v4), desc, cu_seqlens_q, cu_seqlens_k,
                                      max_seqlen_q, max_seqlen_k, is_causal, scale, out_dtype)


@_attention_varlen_fp8_fwd.register_fake
def _(query, key, value, cu_seqlens_q, cu_seqlens_k, q_descale, k_descale, v_descale, cos, sin, max_seqlen_q,
      max_seqlen_k, is_causal, scale, dynamic, out_dtype):
    return query.new_empty((query.shape[0], query.shape[1], value.shape[-1]), dtype=out_dtype)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def parse_fp8(fp8, query, key, value, packed: bool):
    """``fp8`` → (dynamic, (q_descale, k_descale, v_descale) or None); ``ValueError`` naming
    ``fp8`` (or the tensor) when it or the inputs do not fit."""
    tensors = (("query", query), ("key", key), ("value", value))
    if isinstance(fp8, str):
        if fp8 != "dynamic":
            raise ValueError(f"fp8: expected None, 'dynamic' or the descales dict(q_descale=, k_descale=, "
                             f"v_descale=), got {fp8!r}")
        for name, t in tensors:
            if t.dtype not in _DYNAMIC_DTYPES:
                raise ValueError(f"fp8: 'dynamic' quantises float16/bfloat16/float32 inputs; {name} is "
                                 f"{describe(t)} (float8_e4m3fn inputs take fp8=dict(q_descale=, k_descale=, "
                                 f"v_descale=))")
        return True, None
    if isinstance(fp8, dict):
        unknown = set(fp8) - {"q_descale", "k_descale", "v_descale"}
        if unknown:
            raise ValueError(f"fp8: unknown keys {sorted(unknown)} (expected q_descale, k_descale, v_descale)")
        descs = [fp8.get(n) for n in ("q_descale", "k_descale", "v_descale")]
    elif isinstance(fp8, (tuple, list)) and len(fp8) == 3:
        descs = list(fp8)
    else:
        raise ValueError(f"fp8: expected None, 'dynamic', dict(q_descale=, k_descale=, v_descale=) or a "
                         f"(q_descale, k_descale, v_descale) tuple, got {type(fp8).__name__}")
    for name, t in tensors:
        if t.dtype != E4M3:
            raise ValueError(f"fp8: descales are for float8_e4m3fn inputs; {name} is {describe(t)} "
                             f"(quantise it, or pass fp8='dynamic')")
    out = []
    for name, d, x in zip(("q_descale", "k_descale", "v_descale"), descs, (query, key, key)):
        heads = x.shape[1] if (packed or x.dim() < 4) else x.shape[-3]
        per_head = (heads,) if packed else (x.shape[0], heads)
        if d is None:
            d = torch.ones((), dtype=torch.float32, device=x.device)
        if not isinstance(d, torch.Tensor) or d.dtype != torch.float32 or d.device != x.device:
            raise ValueError(f"fp8: {name} must be a float32 tensor on {x.device}, got "
                             f"{describe(d) if isinstance(d, torch.Tensor) else type(d).__name__}")
        if tuple(d.shape) not in ((), tuple(per_head)):
            raise ValueError(f"fp8: {name} must have shape () (per tensor) or {tuple(per_head)} (per head), "
                             f"got {describe(d)}")
        out.append(d)
    return False, tuple(out)


def _stand_ins(*tensors):
    """Zero-stride bf16 tensors of the inputs' shapes and device (no memory): what the bf16
    ops' validators check (they know no float8 dtype)."""
    return [t if t.dtype in _DYNAMIC_DTYPES else
            torch.empty((), dtype=torch.bfloat16, device=t.device).expand(t.shape) for t in tensors]


def _check_inference(query, key, value):
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise ValueError("fp8: the fp8 forward is inference only (no backward); inputs require grad — call "
                         "under torch.no_grad() / torch.inference_mode(), or detach them")


def fp8_reasons(query, value, backend) -> list[str]:
    """Why the fp8 kernels cannot take a call (empty: they can)."""
    reasons = []
    forced = dispatch.forced_backend(backend)
    if forced not in (None, "triton"):
        reasons.append(f"backend {forced!r} is forced (fp8 runs on the Triton backend only)")
    err = triton_import_error()
    if err is not None:
        reasons.append(err)
    elif query.device.type == "cuda":
        cap = torch.cuda.get_device_capability(query.device)
        if cap < (8, 9):
            reasons.append(f"GPU compute capability {cap[0]}.{cap[1]} (e4m3 tensor cores need sm_89+)")
    elif query.device.type == "cpu":
        if not interpreting():
            reasons.append("CPU tensors run the fp8 Triton kernels only with TRITON_INTERPRET=1")
    else:
        reasons.append(f"device {query.device.type!r}")
    d, dv = query.shape[-1], value.shape[-1]
    if d > _MAX_HEAD_DIM:
        reasons.append(f"head dim {d} (fp8 supports up to {_MAX_HEAD_DIM})")
    if dv != d:
        reasons.append(f"Dv = {dv} != D = {d}")
    return reasons


def _fallback(op: str, reasons: list[str], backend) -> None:
    if dispatch.forced_backend(backend) == "triton":
        raise dispatch.BackendNotSupportedError(
            f"mmkernels.{op}: backend 'triton' is forced but the fp8 forward cannot run this call: "
            + "; ".join(reasons))
    key = (op, tuple(reasons))
    if key in _warned or torch.compiler.is_compiling():
        return
    _warned.add(key)
    warnings.warn(f"mmkernels.{op}: fp8 not used ({'; '.join(reasons)}); running the bf16 path", stacklevel=3)


def _dequantised(x, desc, packed):
    """float8 input → bfloat16 (x · descale), for the fallback."""
    d = desc.float()
    if d.dim() == 1:  # packed (H,)
        d = d[None, :, None]
    elif d.dim() == 2:  # dense (B, H)
        d = d[:, :, None, None]
    return (x.float() * d).to(torch.bfloat16)


def _out_dtype(out_dtype, query, dynamic):
    if out_dtype is None:
        return query.dtype if dynamic else torch.bfloat16
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype: expected None, torch.bfloat16, torch.float16 or torch.float32, got {out_dtype}")
    return out_dtype


# --------------------------------------------------------------------------------------
# entry points (called by mk.attention / mk.attention_varlen when fp8 is given)
# --------------------------------------------------------------------------------------
def attention_fp8(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  *, rotary=None, fp8="dynamic", out_dtype=None, backend=None):
    """``mk.attention(..., fp8=...)``: inputs (B, H, L, D)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: fp8 takes 4-D (B, H, L, D) tensors, got "
                             f"{describe(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != query.device:
            raise ValueError(f"{name}: expected device {query.device} like query, got {describe(t)}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"key/value: expected dtype {query.dtype} like query, got {describe(key)}, {describe(value)}")
    dynamic, descs = parse_fp8(fp8, query, key, value, packed=False)
    _check_inference(query, key, value)
    if dropout_p != 0.0:
        raise ValueError(f"fp8: inference only, expected dropout_p = 0, got {dropout_p}")
    if rotary is not None and not dynamic:
        raise ValueError("rotary: with float8_e4m3fn inputs the rotation must come before quantisation; pass "
                         "bf16/fp16 inputs with fp8='dynamic' (rotated in the quantising pre-pass)")
    out_dtype = _out_dtype(out_dtype, query, dynamic)
    attn_mask, is_causal = dense._from_causal_bias(attn_mask, is_causal, query, key)
    # mk.attention's own checks (shapes, GQA, mask, scale) on stand-ins of the inputs' shapes
    batch = dense._validate(*_stand_ins(query, key, value), attn_mask, 0.0, is_causal, scale, enable_gqa)
    _, _, _, attn_mask, _ = dense._as_4d(query, key, value, attn_mask, batch)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    cos = sin = None
    if rotary is not None:
        cos, sin = dense._rotary_3d(rotary, query, key, (query.shape[0],))
    reasons = fp8_reasons(query, value, backend)
    if reasons:
        _fallback("attention", reasons, backend)
        if not dynamic:
            query, key, value = (_dequantised(x, d, False) for x, d in zip((query, key, value), descs))
        out = dense.attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, rotary=rotary,
                              backend=None if dispatch.forced_backend(backend) == "triton" else backend)
        return out.to(out_dtype)
    qd, kd, vd = descs if descs is not None else (None, None, None)
    return _attention_fp8_fwd(query, key, value, attn_mask, qd, kd, vd, cos, sin, bool(is_causal), float(scale),
                              dynamic, out_dtype)


def attention_varlen_fp8(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                         dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, rotary=None, *,
                         fp8="dynamic", out_dtype=None, out=None, backend=None):
    """``mk.attention_varlen(..., fp8=...)``: inputs (total, H, D)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D packed tensor (total, H, D), got "
                             f"{describe(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    dynamic, descs = parse_fp8(fp8, query, key, value, packed=True)
    _check_inference(query, key, value)
    if dropout_p != 0.0:
        raise ValueError(f"fp8: inference only, expected dropout_p = 0, got {dropout_p}")
    if rotary is not None and not dynamic:
        raise ValueError("rotary: with float8_e4m3fn inputs the rotation must come before quantisation; pass "
                         "bf16/fp16 inputs with fp8='dynamic' (rotated in the quantising pre-pass)")
    out_dtype = _out_dtype(out_dtype, query, dynamic)
    # the packed op's own checks (shapes, GQA, cu_seqlens, rotary, scale) on stand-ins of the inputs
    packed_ops._validate(*_stand_ins(query, key, value), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         0.0, scale, enable_gqa, rotary)
    if out is not None and (tuple(out.shape) != (query.shape[0], query.shape[1], value.shape[-1])
                            or out.dtype != out_dtype or out.device != query.device):
        raise ValueError(f"out: expected shape {(query.shape[0], query.shape[1], value.shape[-1])}, dtype "
                         f"{out_dtype} on {query.device}, got {describe(out)}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    reasons = fp8_reasons(query, value, backend)
    if reasons:
        _fallback("attention_varlen", reasons, backend)
        if not dynamic:
            query, key, value = (_dequantised(x, d, True) for x, d in zip((query, key, value), descs))
        res = packed_ops.attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, 0.0, is_causal, scale, enable_gqa, rotary,
                                          backend=None if dispatch.forced_backend(backend) == "triton" else backend)
        res = res.to(out_dtype)
        return res if out is None else out.copy_(res)
    cos = sin = None
    if rotary is not None:
        cos, sin = rotary
        if cos.stride() != sin.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
    qd, kd, vd = descs if descs is not None else (None, None, None)
    res = _attention_varlen_fp8_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, qd, kd, vd, cos, sin,
                                    max_seqlen_q, max_seqlen_k, bool(is_causal), float(scale), dynamic, out_dtype)
    if not packed_ops._host_checks_values(cu_seqlens_q):
        packed_ops._report_bad_cu_seqlens(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0], max_seqlen_q,
                                          max_seqlen_k)
    return res if out is None else out.copy_(res)
