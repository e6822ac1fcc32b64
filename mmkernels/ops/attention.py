"""``mmkernels.attention``: scaled-dot-product attention with SDPA semantics.

Layers: input validation (``ValueError`` naming the argument) → dispatch (triton | sdpa |
reference, see :mod:`mmkernels.dispatch`) → for Triton, the ``torch.library`` ops
``mmkernels::attention_fwd`` / ``mmkernels::attention_bwd`` with ``register_fake`` and
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through without a break.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from .._utils import (
    broadcasts_to,
    check_dropout_and_scale,
    contiguous_outputs,
    describe,
    empty_contiguous,
    triton_device_reason,
)
from ..reference import attention as ref

__all__ = ["attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------
# torch.library ops (Triton path)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("mmkernels::attention_fwd", mutates_args=())
def _attention_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention as kernels

    return kernels.attention_forward(query, key, value, attn_mask, seed, dropout_p, is_causal, scale)


@_attention_fwd.register_fake
def _(query, key, value, attn_mask, seed, dropout_p, is_causal, scale):
    b, h, lq, _ = query.shape
    out = query.new_empty(b, h, lq, value.shape[-1])
    lse = query.new_empty(b, h, 2, lq, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("mmkernels::attention_bwd", mutates_args=())
def _attention_bwd(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import attention as kernels

    return contiguous_outputs(*kernels.attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale
    ))


@_attention_bwd.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale):
    return empty_contiguous(query), empty_contiguous(key), empty_contiguous(value)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, seed, dropout_p, is_causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, attn_mask, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(
        grad_out, query, key, value, out, lse, attn_mask, seed, ctx.dropout_p, ctx.is_causal, ctx.scale
    )
    return dq, dk, dv, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, H, L, D), got {describe(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {describe(t)}"
            )
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(
                f"{name}: expected dtype {query.dtype} on {query.device} like query, got {describe(t)}"
            )
    b, hq, lq, d = query.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise ValueError(
            f"key/value: batch must equal query's batch {b}, got key {describe(key)}, value {describe(value)}"
        )
    if key.shape[-1] != d:
        raise ValueError(f"key: head dim must equal query's head dim {d}, got {describe(key)}")
    if key.shape[1] != value.shape[1] or key.shape[2] != value.shape[2]:
        raise ValueError(
            f"value: expected (B, Hkv, Lk, Dv) with Hkv={key.shape[1]} and Lk={key.shape[2]} as key, "
            f"got {describe(value)}"
        )
    hkv = key.shape[1]
    if hkv != hq:
        if not enable_gqa:
            raise ValueError(
                f"key: query has {hq} heads but key has {hkv} ({describe(key)}); "
                "pass enable_gqa=True for grouped-query attention"
            )
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"key: query heads ({hq}) must be a multiple of key/value heads, got {describe(key)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"attn_mask: expected a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(
                f"attn_mask: expected dtype torch.bool or {query.dtype} (additive, like query), "
                f"got {describe(attn_mask)}"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected device {query.device}, got {describe(attn_mask)}")
        target = (b, hq, lq, key.shape[2])
        if not broadcasts_to(attn_mask, target):
            raise ValueError(
                f"attn_mask: expected a shape broadcastable to (B, H, Lq, Lk) = {target}, got {describe(attn_mask)}"
            )
    check_dropout_and_scale(dropout_p, scale)


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _triton_check(inp) -> list:
    q, k, v, mask = inp["query"], inp["key"], inp["value"], inp["attn_mask"]
    r = triton_device_reason(q)
    if r is not None:
        return [r]
    reasons: list = []
    if q.dtype not in _TRITON_DTYPES:
        reasons.append(f"dtype {q.dtype} (supported: float16, bfloat16, float32)")
    d = q.shape[-1]
    if d % 8 != 0 or not 8 <= d <= _TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim {d} (supported: multiples of 8 up to {_TRITON_MAX_HEAD_DIM})")
    if v.shape[-1] != d:
        reasons.append(f"value head dim {v.shape[-1]} differs from query/key head dim {d}")
    if mask is not None and mask.dtype != torch.bool and mask.requires_grad:
        reasons.append("a float attn_mask that requires grad (mask gradients are not computed)")
    if 0 in q.shape or 0 in k.shape:
        reasons.append("an empty tensor")
    return reasons


def _triton_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    seed = None
    if dropout_p > 0.0:
        # drawn from torch's generator of the tensors' device: torch.manual_seed replays it
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=query.device)
    out, _ = _attention_fwd(query, key, value, attn_mask, seed, float(dropout_p), bool(is_causal), float(scale))
    return out


def _sdpa_check(inp) -> list:
    reasons = []
    if inp["attn_mask"] is not None and inp["is_causal"]:
        reasons.append("attn_mask together with is_causal (SDPA rejects the combination)")
    return reasons


def _sdpa_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    if enable_gqa and key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )


def _reference_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return ref.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


dispatch.register(dispatch.Backend("triton", "attention", _triton_check, _triton_run,
                                   description="fused Triton flash-attention (fwd + bwd)"))
dispatch.register(dispatch.Backend("sdpa", "attention", _sdpa_check, _sdpa_run,
                                   description="torch.nn.functional.scaled_dot_product_attention"))
dispatch.register(dispatch.Backend("reference", "attention", lambda inp: [], _reference_run,
                                   description="plain PyTorch (mmkernels.reference.attention)"))


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Scaled-dot-product attention, a drop-in for ``F.scaled_dot_product_attention``.

    Shapes: ``query`` (B, Hq, Lq, D), ``key`` (B, Hkv, Lk, D), ``value`` (B, Hkv, Lk, Dv)
    → (B, Hq, Lq, Dv).  Lq may differ from Lk.  Hkv < Hq needs ``enable_gqa=True`` and
    Hq % Hkv == 0 (query head h reads key/value head h // (Hq // Hkv)).

    ``attn_mask``: bool (True = attend) or additive float of query's dtype, any shape
    broadcastable to (B, Hq, Lq, Lk) — e.g. HF's (B, 1, 1, Lk) padding mask or
    (B, 1, Lq, Lk) — never materialised at full size.  ``is_causal`` is top-left aligned
    as in SDPA (it may be combined with ``attn_mask`` here, unlike SDPA)::

        Lq=3, Lk=5, is_causal=True      1 0 0 0 0
                                        1 1 0 0 0
                                        1 1 1 0 0

    ``scale`` defaults to 1/sqrt(D).  ``dropout_p > 0`` drops attention probabilities with
    Philox random numbers drawn from torch's generator (``torch.manual_seed`` replays them;
    the backward regenerates the same mask).  A query row whose keys are all masked returns 0
    and gets zero gradients.

    ``backend``: None (auto / ``MMKERNELS_BACKEND`` / ``mmkernels.use_backend``), "triton",
    "sdpa" or "reference".  Dtypes: float16, bfloat16, float32 (honouring
    ``torch.get_float32_matmul_precision()``: "highest" is IEEE fp32, otherwise TF32) on the
    Triton path; float64 goes to the reference.

    Equivalent PyTorch::

        F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                       scale=scale, enable_gqa=enable_gqa)
    """
    _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    inputs = dict(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=float(dropout_p),
                  is_causal=bool(is_causal), scale=float(scale), enable_gqa=bool(enable_gqa))
    chosen = dispatch.select("attention", inputs, backend)
    return chosen.run(**inputs)
