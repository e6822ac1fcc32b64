"""``mmkernels.attention``: scaled-dot-product attention with SDPA semantics.

Layers: input validation (``ValueError`` naming the argument) → dispatch (triton | sdpa |
reference, see :mod:`mmkernels.dispatch`) → for Triton, the ``torch.library`` ops
``mmkernels::attention_fwd`` / ``mmkernels::attention_bwd`` with ``register_fake`` and
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces through without a break.
"""

from __future__ import annotations

import math
from typing import Optional, TypedDict

import torch
import torch.nn.functional as F

from .. import dispatch
from .._utils import (
    broadcasts_to,
    check_dropout_and_scale,
    check_gqa_heads,
    check_rotary_tensor,
    contiguous_outputs,
    describe,
    empty_contiguous,
    masks_keys_only,
    rotary_reasons,
    triton_reasons,
)
from ..reference import attention as ref
from ..reference.rotary import apply_rotary
from . import attention_scores as scores_ops

__all__ = ["attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_MAX_HEAD_DIM = 256


class Inputs(TypedDict):
    """What every backend receives (``check(inputs)``, ``run(**inputs)``), built once per call: the
    tensors as (B, H, L, E) (:func:`_as_4d`), the scale resolved, ``rotary`` as (1 or B, L, D or
    D/2) cos/sin (:func:`_rotary_3d`) or None."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    dropout_p: float
    is_causal: bool
    scale: float
    enable_gqa: bool
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]]


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
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention as kernels

    return kernels.attention_forward(query, key, value, attn_mask, seed, dropout_p, is_causal, scale, cos, sin)


@_attention_fwd.register_fake
def _(query, key, value, attn_mask, seed, dropout_p, is_causal, scale, cos=None, sin=None):
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
    mask_grad: bool = False,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_attn_mask); the last is an empty (0,) tensor unless ``mask_grad``."""
    from ..kernels import attention as kernels

    grads = kernels.attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale, mask_grad, cos, sin
    )
    return contiguous_outputs(*grads[:3], grads[3] if mask_grad else query.new_empty((0,)))


@_attention_bwd.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale, mask_grad=False,
      cos=None, sin=None):
    dmask = empty_contiguous(attn_mask) if mask_grad else query.new_empty((0,))
    return empty_contiguous(query), empty_contiguous(key), empty_contiguous(value), dmask


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, seed, dropout_p, is_causal, scale, cos, sin = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed, cos, sin)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    ctx.mask_grad = attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.requires_grad
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, attn_mask, seed, cos, sin = ctx.saved_tensors
    mask_grad = ctx.mask_grad and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = _attention_bwd(
        grad_out, query, key, value, out, lse, attn_mask, seed, ctx.dropout_p, ctx.is_causal, ctx.scale, mask_grad,
        cos, sin,
    )
    return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# validation and normalisation to (B, H, L, E)
# --------------------------------------------------------------------------------------
def _from_causal_bias(attn_mask, is_causal, query, key):
    """PyTorch's ``CausalBias`` (``causal_upper_left`` / ``causal_lower_right``) passed as
    ``attn_mask`` → (mask or None, is_causal).  Upper-left is SDPA's ``is_causal``; lower-right
    with Lq != Lk becomes its (Lq, Lk) bool mask (query i sees keys j <= i + Lk - Lq)."""
    try:
        from torch.nn.attention.bias import CausalBias, CausalVariant
    except ImportError:  # pragma: no cover - torch without torch.nn.attention.bias
        return attn_mask, is_causal
    if not isinstance(attn_mask, CausalBias):
        return attn_mask, is_causal
    lq, lk = query.shape[-2], key.shape[-2]
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (lq, lk):
        raise ValueError(
            f"attn_mask: a CausalBias for Lq={attn_mask.seq_len_q}, Lk={attn_mask.seq_len_kv}, but query has "
            f"Lq={lq} and key Lk={lk} (query {describe(query)}, key {describe(key)})"
        )
    if attn_mask.variant == CausalVariant.UPPER_LEFT or lq == lk:
        return None, True
    if is_causal:
        raise ValueError("is_causal: cannot be combined with a lower-right CausalBias attn_mask (pick one)")
    return attn_mask._materialize(query.device), False


def _broadcast_batch(name, shapes):
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ValueError(f"{name}: batch dims {[tuple(s) for s in shapes]} of query/key/value do not broadcast")


def _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple:
    """Check the SDPA contract; returns the broadcast batch shape (the dims before H, L, E)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name}: expected a tensor (..., L, E) of at least 2 dims, got {describe(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {describe(t)}"
            )
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(
                f"{name}: expected dtype {query.dtype} on {query.device} like query, got {describe(t)}"
            )
        if t.dim() != query.dim():
            raise ValueError(f"{name}: expected {query.dim()} dims like query {describe(query)}, got {describe(t)}")
    lq, d = query.shape[-2:]
    if key.shape[-1] != d:
        raise ValueError(f"key: head dim must equal query's head dim {d}, got {describe(key)}")
    if key.shape[-2] != value.shape[-2] or (key.dim() > 2 and key.shape[-3] != value.shape[-3]):
        raise ValueError(
            f"value: expected (..., Hkv, Lk, Dv) with the heads and length of key {describe(key)}, "
            f"got {describe(value)}"
        )
    hq = query.shape[-3] if query.dim() > 2 else 1
    check_gqa_heads(hq, key.shape[-3] if key.dim() > 2 else 1, enable_gqa, key)
    batch = _broadcast_batch("key", [query.shape[:-3], key.shape[:-3], value.shape[:-3]])
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"attn_mask: expected a tensor, a CausalBias or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise ValueError(
                f"attn_mask: expected dtype torch.bool (True = attend), or an additive float32 or {query.dtype} "
                f"mask, got {describe(attn_mask)}"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected device {query.device}, got {describe(attn_mask)}")
        target = (*batch, hq, lq, key.shape[-2])
        if not broadcasts_to(attn_mask, target):
            raise ValueError(
                f"attn_mask: expected a shape broadcastable to (..., H, Lq, Lk) = {target}, got {describe(attn_mask)}"
            )
    check_dropout_and_scale(dropout_p, scale, allow_one=True)
    return batch


def _as_4d(query, key, value, attn_mask, batch):
    """Views of the inputs as (B, H, L, E) (leading batch dims broadcast and flattened, a 2-/3-D
    input gets unit batch/head dims) and the output shape to restore."""
    hq = query.shape[-3] if query.dim() > 2 else 1
    lq, lk = query.shape[-2], key.shape[-2]
    nb = math.prod(batch)

    def four(t):
        if t.dim() == 4 and t.shape[0] == nb:  # the common case: the caller's tensor itself
            return t
        t = t.reshape((1,) * max(0, 3 - t.dim()) + tuple(t.shape)) if t.dim() < 3 else t
        t = t.expand(*batch, *t.shape[-3:])
        return t.reshape(nb, *t.shape[-3:])

    q4, k4, v4 = four(query), four(key), four(value)
    mask = attn_mask
    if mask is not None:
        mask = mask.expand(*batch, hq, lq, lk).reshape(nb, hq, lq, lk) if len(batch) != 1 or mask.dim() > 4 else mask
        while mask.dim() < 4:  # (Lk,) or (Lq, Lk): SDPA itself fails on a 1-D mask
            mask = mask.unsqueeze(0)
    out_shape = (*batch, hq, lq, value.shape[-1]) if query.dim() > 2 else (lq, value.shape[-1])
    return q4, k4, v4, mask, out_shape


def _rotary_3d(rotary, query, key, batch):
    """Check ``rotary=(cos, sin)`` and return it as (1 or B, L, D or D/2) tensors sharing strides,
    B the flattened batch of :func:`_as_4d`."""
    if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
        raise ValueError(f"rotary: expected a (cos, sin) pair of tensors, got {type(rotary).__name__}")
    lq, d = query.shape[-2:]
    if d % 2:
        raise ValueError(f"rotary: needs an even head dim, query is {describe(query)}")
    if key.shape[-2] != lq:
        raise ValueError(f"rotary: cos/sin are shared by query and key, so Lk must equal Lq ({lq}), got key "
                         f"{describe(key)}")
    out = []
    for name, t in zip(("rotary cos", "rotary sin"), rotary):
        check_rotary_tensor(name, t, query)
        if t.shape[-1] not in (d, d // 2) or t.dim() < 2 or t.shape[-2] != lq or \
                (t.dim() > 2 and tuple(t.shape[:-2]) != tuple(batch)):
            raise ValueError(f"{name}: expected (L, D) or (..., L, D) with query's batch dims {tuple(batch)}, "
                             f"L={lq}, D={d} (or D/2={d // 2}), got {describe(t)}")
        out.append(t.reshape(1 if t.dim() == 2 else math.prod(batch), lq, t.shape[-1]))
    if out[0].shape != out[1].shape:
        raise ValueError(f"rotary sin: expected the shape of cos {tuple(rotary[0].shape)}, got {describe(rotary[1])}")
    if out[0].stride() != out[1].stride():  # the kernels index both with cos's strides
        out = [t.contiguous() for t in out]
    return tuple(out)


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _math_nans(out, query, key, value, attn_mask=None, *, queries=False, keys=False, values=False,
               mask_rows=False, rotary=None):
    """``out`` (B, Hq, Lq, Dv) with NaN where SDPA's math backend has one that a route may not
    produce itself — the part of the NaN rule (:func:`attention`, "NaN and Inf") that lives at
    positions a route skips or selects away (keys above the causal band, causal / bool-masked
    logits): ``queries``: the rows whose query holds a NaN (needed where a bool mask hides all
    of a row's keys); ``keys``: every element of the heads whose key (B, Hkv, Lk, D) holds a NaN
    (with ``rotary``, also every head of a batch whose cos/sin hold one: the rotated keys do);
    ``values``: column d of the heads whose value column d holds a NaN; ``mask_rows``: the rows of
    a float ``attn_mask`` holding a NaN or +inf.  Device ops only (never a host read): ``amax``
    reductions over Q, K, V, the mask (NaN survives them) and one ``masked_fill`` of ``out``; the
    kernels' loops pay nothing."""
    cols = rows = None
    if keys and key.shape[-2] > 0 and key.shape[-1] > 0:
        cols = torch.isnan(key.amax(dim=(-2, -1)))[..., None, None]  # (B, Hkv, 1, 1)
        for t in rotary or ():  # (1 or B, L, D or D/2)
            cols = cols | torch.isnan(t.amax(dim=(-2, -1)))[:, None, None, None]
    if values and value.shape[-2] > 0:
        vb = torch.isnan(value.amax(dim=-2))[..., None, :]  # (B, Hkv, 1, Dv)
        cols = vb if cols is None else cols | vb
    if cols is not None and cols.shape[1] != out.shape[1]:  # GQA: a kv head's flags go to its query heads
        cols = cols.repeat_interleave(out.shape[1] // cols.shape[1], dim=1)
    if queries and query.shape[-1] > 0:
        rows = torch.isnan(query.amax(dim=-1, keepdim=True))  # (B, Hq, Lq, 1)
    if mask_rows and attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.shape[-1] > 0:
        top = attn_mask.amax(dim=-1, keepdim=True)  # (.., Lq, 1): NaN / +inf iff the row holds one
        mb = torch.isnan(top) | torch.isposinf(top)
        rows = mb if rows is None else rows | mb
    bad = rows if cols is None else cols if rows is None else rows | cols
    return out if bad is None else out.masked_fill(bad, float("nan"))


def _triton_nans(out, query, key, value, attn_mask, is_causal, rotary=None):
    """The Triton forward + :func:`_math_nans` where the kernel can miss a NaN: causal (skipped
    and selected-away keys, mask entries above the diagonal), bool masks (selected-away keys,
    a NaN query row with every key hidden; V needs nothing there: every key tile is visited and
    0·NaN = NaN) and key-only masks of either dtype (the kernels skip the keys past a batch
    row's last kept key: their K and V, and the query of a row that sees no key)."""
    bool_mask = attn_mask is not None and attn_mask.dtype == torch.bool
    key_only = attn_mask is not None and masks_keys_only(attn_mask, (*out.shape[:3], key.shape[-2]))
    if not (is_causal or bool_mask or key_only):
        return out
    return _math_nans(out, query, key, value, attn_mask, queries=bool_mask or key_only, keys=True,
                      values=is_causal or key_only, mask_rows=is_causal, rotary=rotary)


def _triton_check(inp: Inputs) -> list:
    q, k, v = inp["query"], inp["key"], inp["value"]
    reasons = triton_reasons(q, head_dim=max(q.shape[-1], v.shape[-1]), min_head_dim=1,
                             max_head_dim=_TRITON_MAX_HEAD_DIM, nonempty=(q, k))
    if inp["dropout_p"] >= 1.0:
        reasons.append("dropout_p = 1 (every probability is dropped)")
    return reasons + rotary_reasons(inp["rotary"], q, v)


def _triton_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, rotary=None):
    seed = None
    if dropout_p > 0.0:
        # drawn from torch's generator of the tensors' device: torch.manual_seed replays it
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=query.device)
    d, dv = query.shape[-1], value.shape[-1]
    query0, key0, value0 = query, key, value  # unpadded, for the NaN rule's pass
    # Dv != D: the kernels take one head dim, so the narrower side is zero-padded (zero columns
    # of Q/K add nothing to QKᵀ; zero columns of V give output columns that are sliced off).
    # A copy of that side per call: this case is rare in VLMs, the common one pays nothing.
    if dv < d:
        value = F.pad(value, (0, d - dv))
    elif dv > d:
        query, key = F.pad(query, (0, dv - d)), F.pad(key, (0, dv - d))
    cos, sin = rotary if rotary is not None else (None, None)
    out, _ = _attention_fwd(query, key, value, attn_mask, seed, float(dropout_p), bool(is_causal), float(scale),
                            cos, sin)
    return _triton_nans(out[..., :dv] if dv < d else out, query0, key0, value0, attn_mask, is_causal, rotary)


def _sdpa_check(inp: Inputs) -> list:
    if inp["key"].shape[-2] == 0:
        return ["no keys (Lk = 0): SDPA gives NaN where mmkernels gives 0"]
    return []


def _rotated(query, key, rotary):
    """q, k with the vision RoPE applied in torch (the non-Triton routes); cos/sin (B or 1, L, ·)."""
    if rotary is None:
        return query, key
    cos, sin = (t.unsqueeze(-3) for t in rotary)  # broadcast over heads
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)


def _sdpa_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, rotary=None):
    query, key = _rotated(query, key, rotary)
    if enable_gqa and key.shape[1] != query.shape[1]:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if attn_mask is not None and is_causal:
        # older torch rejects the pair; recent torch applies both: the same, made explicit.  A float
        # mask gets -inf added above the diagonal (not filled): a NaN / +inf entry there stays NaN,
        # as SDPA's math makes it
        tril = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & tril
        else:
            attn_mask = attn_mask + torch.zeros(tril.shape, dtype=attn_mask.dtype,
                                                device=tril.device).masked_fill_(~tril, float("-inf"))
        is_causal = False
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
    # SDPA's fused kernels skip the keys above the causal band (the CPU flash kernel too): the
    # NaN rule's keys / values part is added back; with a mask every key is computed
    return _math_nans(out, query, key, value, keys=is_causal, values=is_causal)


def _reference_run(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, rotary=None):
    query, key = _rotated(query, key, rotary)
    # a fallback must not be less accurate than SDPA: fp16/bf16 are computed in fp32
    # (measured before: forward errors of 0.02-0.17 in fp16 with a causal float bias)
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
    out = ref.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return out.to(dtype)


dispatch.register(dispatch.Backend("triton", "attention", _triton_check, _triton_run,
                                   description="fused Triton flash-attention (fwd + bwd)"))
dispatch.register(dispatch.Backend("sdpa", "attention", _sdpa_check, _sdpa_run,
                                   description="torch.nn.functional.scaled_dot_product_attention"))
dispatch.register(dispatch.Backend("reference", "attention", lambda inp: [], _reference_run,
                                   description="plain PyTorch (mmkernels.reference.attention)"))


# --------------------------------------------------------------------------------------
# attention and its scores from one forward (mk.attention(..., return_scores=...))
# --------------------------------------------------------------------------------------
def attention_with_scores(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                          enable_gqa=False, *, query_index=None, reduce_heads="mean", backend=None):
    """``(mk.attention(...), mk.attention_scores(...))`` from one forward: on the Triton path the
    scores reuse the forward's row statistics (no second softmax pass); on the other backends the
    two run one after the other.  The scores are those of the softmax before dropout.  What
    ``mk.attention(..., return_scores=dict(query_index=..., reduce_heads=...))`` runs; inputs
    (B, H, L, E) (a query batch of 1 broadcasts against the keys', as in ``mk.attention``)."""
    attn_mask, is_causal = _from_causal_bias(attn_mask, is_causal, query, key)
    batch = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if query.dim() != 4:
        raise ValueError(f"return_scores: expected 4-D inputs (B, H, L, E), got query {describe(query)}")
    query, key, value, attn_mask, _ = _as_4d(query, key, value, attn_mask, batch)
    scores_ops._validate(query, key, None, attn_mask, is_causal, scale, enable_gqa, reduce_heads)
    b, h, lq, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    inputs = Inputs(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=float(dropout_p),
                    is_causal=bool(is_causal), scale=scale, enable_gqa=bool(enable_gqa), rotary=None)
    chosen = dispatch.select("attention", inputs, backend)
    rows = scores_ops.query_rows(query_index, b, lq, query.device)
    if chosen.name == "triton" and value.shape[-1] == d:
        seed = None
        if dropout_p > 0.0:  # as the Triton backend draws it: torch.manual_seed replays the mask
            seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=query.device)
        out, lse = _attention_fwd(query, key, value, attn_mask, seed, float(dropout_p), bool(is_causal), scale)
        out = _triton_nans(out, query, key, value, attn_mask, is_causal)
        stats = scores_ops._stats_from_lse(lse.detach(), rows, b, h, lq)
    else:
        out, stats = chosen.run(**inputs), None
    mask = attn_mask.detach() if attn_mask is not None else None
    forced = dispatch.forced_backend(backend)
    # the scores have triton and reference backends only: a forced sdpa/cuda attention gets the reference
    score_backend = "triton" if chosen.name == "triton" else (
        "reference" if forced not in (None, "reference") else forced)
    scores = scores_ops._run_scores(query.detach(), key.detach(), rows, stats, mask, is_causal, scale, score_backend)
    return out, scores_ops._reduce(scores, reduce_heads)


def scores_request(return_scores) -> dict:
    """``mk.attention``'s ``return_scores`` argument → keyword arguments of
    :func:`attention_with_scores` (a dict with ``query_index`` and/or ``reduce_heads``)."""
    if not isinstance(return_scores, dict) or set(return_scores) - {"query_index", "reduce_heads"}:
        raise ValueError(f"return_scores: expected a dict with keys query_index and/or reduce_heads, "
                         f"got {return_scores!r}")
    return dict(return_scores)


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
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
    return_scores: dict | None = None,
    fp8: str | dict | tuple | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    r"""Scaled-dot-product attention, a drop-in for ``F.scaled_dot_product_attention``.

    Shapes: ``query`` (..., Hq, Lq, D), ``key`` (..., Hkv, Lk, D), ``value`` (..., Hkv, Lk, Dv)
    → (..., Hq, Lq, Dv), as SDPA: the leading batch dims (any number, 2-D inputs included)
    broadcast between query and key/value (a query batch of 1 against a key batch of B).
    Lq may differ from Lk; Dv may differ from D.  Hkv < Hq needs ``enable_gqa=True`` and
    Hq % Hkv == 0 (query head h reads key/value head h // (Hq // Hkv)).

    ``attn_mask``: bool (True = attend) or additive float (float32 or query's dtype), any shape
    broadcastable to (..., Hq, Lq, Lk) — e.g. HF's (B, 1, 1, Lk) padding mask, (B, 1, Lq, Lk),
    or a (Lk,) key mask — never materialised at full size; or PyTorch's ``CausalBias``
    (``causal_upper_left`` is ``is_causal``; ``causal_lower_right`` aligns the diagonal to the
    last key).  ``is_causal`` is top-left aligned as in SDPA; with ``attn_mask`` both apply::

        Lq=3, Lk=5, is_causal=True      1 0 0 0 0
                                        1 1 0 0 0
                                        1 1 1 0 0

    ``scale`` defaults to 1/sqrt(D).  ``dropout_p > 0`` drops attention probabilities with
    Philox random numbers drawn from torch's generator (``torch.manual_seed`` replays them;
    the backward regenerates the same mask).  A query row whose keys are all masked returns 0
    and gets zero gradients (torch 2.13's math backend gives 0 there too; older torch gave NaN).

    NaN and Inf — every backend gives SDPA's math backend's NaN pattern (and its finite values
    elsewhere): a NaN in query row i makes row i NaN, even when all its keys are masked; a NaN in
    key j makes every element of the heads reading that key head NaN, however j is hidden
    (``is_causal``, a bool False or a -inf entry: math adds masks as -inf, NaN + -inf = NaN); a
    NaN in value (j, d) makes column d of every row of those heads NaN (masked probabilities are
    exact zeros and 0·NaN = NaN); a float-mask entry (i, j) that is NaN or +inf makes row i NaN,
    also above the causal diagonal (+inf + -inf = NaN), while -inf is the ordinary "masked".
    ±inf inside query/key/value follow the arithmetic and are not pinned down.  Cost: with
    ``is_causal`` or a bool mask the Triton route adds a reduction over K (bool mask: also Q;
    causal: also V, and a float mask's rows) and one pass over the output; the kernels are
    unchanged but for a NaN-keeping float-mask clamp (same instruction count).

    ``rotary=(cos, sin)`` (keyword only; needs Lq == Lk): the vision RoPE of Qwen2-VL's
    ``apply_rotary_pos_emb_vision`` (rotate-half, fp32 math, rounded to the input dtype) applied
    to query and key (on Triton by one O(L·d) pre-pass kernel before the plain loops), gradients
    rotated back in the backward.  cos/sin are (L, D) shared by the batch, or (..., L, D) with
    query's leading batch dims, one row per position; (L, D/2) / (..., L, D/2) stand for
    ``cat((c, c), -1)``.  They get no gradient.
    Equivalent: ``q, k = q·cos + rotate_half(q)·sin, k·cos + rotate_half(k)·sin`` (cos
    unsqueezed over the heads) before the attention.

    ``backend``: None (auto / ``MMKERNELS_BACKEND`` / ``mmkernels.use_backend``), "triton",
    "sdpa" or "reference".  Dtypes: float16, bfloat16, float32 (honouring
    ``torch.get_float32_matmul_precision()``: "highest" is IEEE fp32, otherwise TF32) on the
    Triton path, every head dim up to 256; float64 and ``dropout_p=1`` go to SDPA / the
    reference (which computes fp16/bf16 in fp32).  A float ``attn_mask`` that requires grad
    (a learnable bias, e.g. BEiT's relative positions) gets its gradient: dS summed over the
    dims it broadcasts along.

    ``return_scores=dict(query_index=..., reduce_heads=...)`` (4-D inputs): returns
    ``(out, scores)``, the scores of :func:`mmkernels.attention_scores` for the same call, computed
    from this forward's row statistics (no second softmax pass on the Triton path).

    ``fp8`` (keyword only; inference, 4-D inputs): the e4m3 forward on sm_89+ / sm_90 (docs/fp8.md).
    ``"dynamic"``: float16/bfloat16 inputs quantised per (batch, head) by a fused pre-pass (rotary
    applied first); ``dict(q_descale=, k_descale=, v_descale=)`` (or a tuple): float8_e4m3fn inputs
    with float32 descales of shape () or (B, H) (H = Hq for q, Hkv for k, v).  Output
    ``out_dtype`` (default: the input dtype for "dynamic", bfloat16 for float8 inputs).  Inputs
    requiring grad or ``dropout_p > 0`` raise; where the fp8 kernels cannot run (CPU without the
    interpreter, a GPU below sm_89, D > 256, Dv != D) one warning and the bf16 path (the Triton
    backend forced: an error).

    Equivalent PyTorch::

        F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                       scale=scale, enable_gqa=enable_gqa)
    """
    if fp8 is not None:
        if return_scores is not None:
            raise ValueError("fp8: not supported together with return_scores")
        from .attention_fp8 import attention_fp8

        return attention_fp8(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, rotary=rotary,
                             fp8=fp8, out_dtype=out_dtype, backend=backend)
    if out_dtype is not None:
        raise ValueError("out_dtype: only with fp8 (the other paths return the inputs' dtype)")
    if return_scores is not None:
        if rotary is not None:
            raise ValueError("rotary: not supported together with return_scores (the scores pass reads q/k unrotated)")
        return attention_with_scores(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                     backend=backend, **scores_request(return_scores))
    attn_mask, is_causal = _from_causal_bias(attn_mask, is_causal, query, key)
    batch = _validate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    q, k, v, mask, out_shape = _as_4d(query, key, value, attn_mask, batch)
    inputs = Inputs(query=q, key=k, value=v, attn_mask=mask, dropout_p=float(dropout_p), is_causal=bool(is_causal),
                    scale=float(scale), enable_gqa=bool(enable_gqa),
                    rotary=None if rotary is None else _rotary_3d(rotary, query, key, batch))
    chosen = dispatch.select("attention", inputs, backend)
    out = chosen.run(**inputs)
    return out if out.shape == out_shape else out.reshape(out_shape)
