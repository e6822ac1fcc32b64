"""``mmkernels.attention_varlen``: packed attention over sequences of different lengths
(flash-attn's varlen layout), with the vision rotary embedding optionally fused.

Layers: validation (``ValueError`` naming the argument) → dispatch (triton | sdpa | reference) →
for Triton the ``torch.library`` ops ``mmkernels::attention_varlen_fwd`` / ``..._bwd`` (fake +
autograd registered).  Nothing on the triton and sdpa routes reads a device value on the host,
so the op is CUDA-graph capturable and compiles with no graph break; the reference backend loops
over the sequences on the host and is only used when forced.
"""

from __future__ import annotations

import math
from typing import Optional, TypedDict

import torch
import torch.nn.functional as F

from .. import dispatch
from .._utils import (
    check_dropout_and_scale,
    check_gqa_heads,
    check_rotary_tensor,
    contiguous_outputs,
    cu_seqlens_problems,
    describe,
    empty_contiguous,
    rotary_reasons,
    safe_cu_seqlens,
    triton_reasons,
)
from ..reference import attention_varlen as ref

__all__ = ["attention_varlen"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_MAX_HEAD_DIM = 256


class Inputs(TypedDict):
    """What every backend receives (``check(inputs)``, ``run(**inputs)``), built once per call: the
    packed tensors as given, the scale resolved, ``rotary`` the (cos, sin) pair or None."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: Optional[int]
    max_seqlen_k: Optional[int]
    dropout_p: float
    is_causal: bool
    scale: float
    enable_gqa: bool
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]]
    out: Optional[torch.Tensor]
    scores: Optional[tuple[Optional[torch.Tensor], Optional[str]]]


# --------------------------------------------------------------------------------------
# torch.library ops (Triton path)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("mmkernels::attention_varlen_fwd", mutates_args=())
def _varlen_fwd(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels import attention_varlen as kernels

    return kernels.varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, seed,
                                  max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale)


@_varlen_fwd.register_fake
def _(query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, max_seqlen_q, max_seqlen_k, dropout_p,
      is_causal, scale):
    total_q, h, _ = query.shape
    return query.new_empty(total_q, h, value.shape[-1]), query.new_empty(h, 2, total_q, dtype=torch.float32)


@torch.library.custom_op("mmkernels::attention_varlen_fwd_out", mutates_args=("out",))
def _varlen_fwd_out(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    out: torch.Tensor,
) -> None:
    """The forward writing into the caller's ``out`` (inference only: no autograd, no LSE kept)."""
    from ..kernels import attention_varlen as kernels

    kernels.varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, max_seqlen_q,
                           max_seqlen_k, dropout_p, is_causal, scale, out=out)


@_varlen_fwd_out.register_fake
def _(query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, max_seqlen_q, max_seqlen_k, dropout_p,
      is_causal, scale, out):
    return None


@torch.library.custom_op("mmkernels::attention_varlen_bwd", mutates_args=())
def _varlen_bwd(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    dropout_p: float,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..kernels import attention_varlen as kernels

    return contiguous_outputs(*kernels.varlen_backward(
        grad_out, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, cos, sin, seed,
        max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale))


@_varlen_bwd.register_fake
def _(grad_out, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, max_seqlen_q,
      max_seqlen_k, dropout_p, is_causal, scale):
    return empty_contiguous(query), empty_contiguous(key), empty_contiguous(value)


def _setup_context(ctx, inputs, output):
    (query, key, value, cu_q, cu_k, cos, sin, seed, max_q, max_k, dropout_p, is_causal, scale) = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, cu_q, cu_k, cos, sin, seed)
    ctx.max_q, ctx.max_k = max_q, max_k
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, cu_q, cu_k, cos, sin, seed = ctx.saved_tensors
    dq, dk, dv = _varlen_bwd(grad_out, query, key, value, out, lse, cu_q, cu_k, cos, sin, seed,
                             ctx.max_q, ctx.max_k, ctx.dropout_p, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_varlen_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mmkernels::attention_varlen_fwd_scores", mutates_args=())
def _varlen_fwd_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    row_weights: Optional[torch.Tensor],
    reduce_heads: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward with the key importance accumulated by the same kernel: (O, statistics,
    scores), scores fp32 (total_k,) (``reduce_heads`` "mean" / "sum") or (Hq, total_k) ("none");
    ``row_weights`` (total_q,) fp32 (:func:`score_row_weights`) or None for every row."""
    from ..kernels import attention_varlen as kernels

    return kernels.varlen_forward(query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, max_seqlen_q,
                                  max_seqlen_k, dropout_p, is_causal, scale,
                                  scores=(row_weights, None if reduce_heads == "none" else reduce_heads))


@_varlen_fwd_scores.register_fake
def _(query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, max_seqlen_q, max_seqlen_k, dropout_p,
      is_causal, scale, row_weights, reduce_heads):
    total_q, h, _ = query.shape
    shape = (h, key.shape[0]) if reduce_heads == "none" else (key.shape[0],)
    return (query.new_empty(total_q, h, value.shape[-1]), query.new_empty(h, 2, total_q, dtype=torch.float32),
            query.new_empty(shape, dtype=torch.float32))


def _setup_context_scores(ctx, inputs, output):
    _setup_context(ctx, inputs[:13], output[:2])
    ctx.mark_non_differentiable(output[1], output[2])


def _backward_scores(ctx, grad_out, grad_lse, grad_scores):
    return (*_backward(ctx, grad_out, grad_lse), None, None)


_varlen_fwd_scores.register_autograd(_backward_scores, setup_context=_setup_context_scores)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _check_cu_seqlens(name: str, cu, total: int, device, n_expected: int | None) -> None:
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name}: expected an int32 tensor (n+1,), got {type(cu).__name__}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name}: expected a 1-D tensor (n+1,) of prefix sums, got {describe(cu)}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32 (flash-attn's varlen convention), got {describe(cu)}")
    if cu.device != device:
        raise ValueError(f"{name}: expected device {device} like query, got {describe(cu)}")
    if n_expected is not None and cu.shape[0] != n_expected:
        raise ValueError(f"{name}: expected {n_expected} entries like cu_seqlens_q, got {describe(cu)}")


def _check_cu_values(name: str, cu: torch.Tensor, total: int, max_seqlen: int | None) -> None:
    """The precise ``ValueError`` for bad ``cu_seqlens`` values; reads them on the host, so it
    runs only where that costs no device sync (a CPU tensor, eager) or the route syncs anyway
    (the reference backend).  Everywhere else the device check of :func:`_report_bad_cu_seqlens`
    reports them."""
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()) or bool(cu[0] != 0):
        raise ValueError(f"{name}: expected non-decreasing prefix sums starting at 0, got {describe(cu)} "
                         f"= {cu.tolist() if cu.numel() <= 16 else '...'}")
    if bool(cu[-1] > total):
        raise ValueError(f"{name}: last entry must be at most the packed length {total} (rows past it are "
                         f"padding), got {describe(cu)} ending in {int(cu[-1])}")
    if max_seqlen is not None and steps.numel() and bool((steps > max_seqlen).any()):
        raise ValueError(f"max_seqlen_{name[-1]}: the hint {max_seqlen} is smaller than the longest sequence "
                         f"of {name} ({int(steps.max())})")


def _host_checks_values(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _report_bad_cu_seqlens(cu_q, cu_k, total_q: int, total_k: int, max_q, max_k) -> None:
    """Bad ``cu_seqlens`` values reported without a host sync: a device-side assertion
    (``torch._assert_async``; works under ``torch.compile`` and CUDA-graph capture) that fires
    at the next synchronising point.  The kernels themselves run on clamped boundaries
    (:func:`mmkernels._utils.safe_cu_seqlens`), so they never touch memory outside their
    tensors, whatever the values."""
    bad = cu_seqlens_problems(cu_q, total_q, max_q) | cu_seqlens_problems(cu_k, total_k, max_k)
    torch._assert_async(
        ~bad,
        "mmkernels.attention_varlen: invalid cu_seqlens_q / cu_seqlens_k (expected int32 prefix sums "
        "non-decreasing from 0 to at most the packed length, each length at most the max_seqlen hint); the "
        "kernels ran on clamped boundaries, so the result of this call is not meaningful",
    )


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte of the memory ``t`` spans (a non-empty tensor)."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) * t.element_size()
    return t.data_ptr(), t.data_ptr() + last + t.element_size() - 1


def _check_out(out, query, value, others) -> None:
    """``out=``: the caller's (total_q, Hq, Dv) buffer in query's dtype and device, any strides,
    written in place; no autograd (as torch's ``out=`` functions), no internal overlap, and (in
    eager mode, where data pointers exist) no memory shared with an input."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out: expected None or a torch.Tensor, got {type(out).__name__}")
    expected = (query.shape[0], query.shape[1], value.shape[-1])
    if tuple(out.shape) != expected or out.dtype != query.dtype or out.device != query.device:
        raise ValueError(f"out: expected shape {expected}, dtype {query.dtype} on {query.device} "
                         f"(total_q, Hq, Dv like the result), got {describe(out)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, *others)):
        raise ValueError("out: writing into a caller's buffer does not support autograd (as torch's out= "
                         "functions); call under torch.no_grad() / torch.inference_mode(), or drop out= "
                         f"(inputs requiring grad: query {describe(query)})")
    if torch.compiler.is_compiling() or out.numel() == 0:
        return
    if torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"out: expected a buffer whose elements do not overlap (not an expanded view), "
                         f"got {describe(out)} with strides {tuple(out.stride())}")
    lo, hi = _extent(out)
    for name, t in zip(("query", "key", "value", "rotary cos", "rotary sin", "cu_seqlens_q", "cu_seqlens_k"),
                       others):
        if t is not None and t.numel() and t.device == out.device:
            tlo, thi = _extent(t)
            if tlo <= hi and lo <= thi:
                raise ValueError(f"out: shares memory with {name} ({describe(t)}); expected a separate buffer "
                                 f"(the kernels read the inputs while writing out)")


def _validate(query, key, value, cu_q, cu_k, max_q, max_k, dropout_p, scale, enable_gqa, rotary) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D packed tensor (total, H, D), got {describe(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {describe(t)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{name}: expected dtype {query.dtype} on {query.device} like query, got {describe(t)}")
    total_q, hq, d = query.shape
    if d == 0:
        raise ValueError(f"query: head dim 0 (softmax of all-zero scores would silently average value); "
                         f"expected D >= 1, got {describe(query)}")
    if key.shape[-1] != d:
        raise ValueError(f"key: head dim must equal query's head dim {d}, got {describe(key)}")
    if value.shape[0] != key.shape[0] or value.shape[1] != key.shape[1]:
        raise ValueError(f"value: expected (total_k, Hkv, Dv) with total_k={key.shape[0]} and Hkv={key.shape[1]} "
                         f"as key, got {describe(value)}")
    check_gqa_heads(hq, key.shape[1], enable_gqa, key)
    _check_cu_seqlens("cu_seqlens_q", cu_q, total_q, query.device, None)
    _check_cu_seqlens("cu_seqlens_k", cu_k, key.shape[0], query.device, cu_q.shape[0])
    if _host_checks_values(cu_q):
        _check_cu_values("cu_seqlens_q", cu_q, total_q, max_q)
        _check_cu_values("cu_seqlens_k", cu_k, key.shape[0], max_k)
    for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
            raise ValueError(f"{name}: expected None or a non-negative int (an upper bound hint), got {m!r}")
    check_dropout_and_scale(dropout_p, scale)
    if rotary is not None:
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise ValueError(f"rotary: expected a (cos, sin) pair of tensors, got {type(rotary).__name__}")
        if d % 2:
            raise ValueError(f"rotary: needs an even head dim, query is {describe(query)}")
        if key.shape[0] != total_q:
            raise ValueError(f"rotary: cos/sin are shared by query and key, so total_k must equal total_q "
                             f"({total_q}), got key {describe(key)}")
        for name, t in zip(("rotary cos", "rotary sin"), rotary):
            check_rotary_tensor(name, t, query)
            if tuple(t.shape) not in ((total_q, d), (total_q, d // 2)):
                raise ValueError(f"{name}: expected shape (total, D) = {(total_q, d)} or (total, D/2) = "
                                 f"{(total_q, d // 2)}, got {describe(t)}")
        if rotary[0].shape != rotary[1].shape:
            raise ValueError(f"rotary sin: expected the shape of cos {tuple(rotary[0].shape)}, "
                             f"got {describe(rotary[1])}")


def _scores_request(return_scores, query) -> tuple:
    """``return_scores`` → (query_index as an (m,) int64 tensor or None, reduce_heads), or
    ``ValueError`` naming what is wrong."""
    if not isinstance(return_scores, dict) or set(return_scores) - {"query_index", "reduce_heads"}:
        raise ValueError(f"return_scores: expected a dict with keys query_index and/or reduce_heads, "
                         f"got {return_scores!r}")
    qi = return_scores.get("query_index")
    reduce_heads = return_scores.get("reduce_heads", "mean")
    if reduce_heads not in ("mean", "sum", None):
        raise ValueError(f"return_scores: reduce_heads expected 'mean', 'sum' or None, got {reduce_heads!r}")
    if qi is None:
        return None, reduce_heads
    bad = ValueError(f"return_scores: query_index expected None (every row), an int or a non-empty list / 1-D "
                     f"integer tensor of row numbers local to each sequence (0 = its first row, -1 = its last), "
                     f"got {qi if not isinstance(qi, torch.Tensor) else describe(qi)!r}")
    if isinstance(qi, bool):
        raise bad
    if isinstance(qi, int):
        qi = [qi]
    if isinstance(qi, (list, tuple)):
        if not qi or not all(isinstance(i, int) and not isinstance(i, bool) for i in qi):
            raise bad
        return torch.tensor(qi, dtype=torch.int64, device=query.device), reduce_heads
    if isinstance(qi, torch.Tensor):
        if qi.dim() != 1 or qi.numel() == 0 or qi.dtype.is_floating_point or qi.dtype.is_complex \
                or qi.dtype == torch.bool:
            raise bad
        return qi.to(device=query.device, dtype=torch.int64), reduce_heads
    raise bad


def score_row_weights(query_index: torch.Tensor | None, cu_seqlens_q: torch.Tensor, total_q: int):
    """(total_q,) fp32 weight of each packed query row in the scores: how many times
    ``query_index`` ((m,) int64 row numbers local to each sequence, negatives counted from the
    sequence's end; None: every row, returned as None) selects it.  An index outside a sequence
    selects nothing there; the rows past ``cu_seqlens_q[-1]`` (padding) are never selected.
    Device ops only (no host read, static shapes: capturable and compiled without a break)."""
    if query_index is None:
        return None
    cu = safe_cu_seqlens(cu_seqlens_q, total_q)  # + the padding tail, whose rows stay unselected
    n = cu.shape[0] - 1
    starts, lens = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    idx = query_index[None, :]
    local = torch.where(idx < 0, idx + lens[:, None], idx)
    ok = (local >= 0) & (local < lens[:, None]) & (torch.arange(n, device=cu.device) < n - 1)[:, None]
    pos = (starts[:, None] + local).clamp(0, max(total_q - 1, 0))
    w = torch.zeros(total_q, dtype=torch.float32, device=cu.device)
    return w.index_add_(0, pos.flatten(), ok.flatten().to(torch.float32))


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _triton_check(inp: Inputs) -> list:
    q, v = inp["query"], inp["value"]
    # any head dim: the kernels split it into power-of-two chunks and zero-pad in registers
    # (the ALIGNED hint only when the strides are multiples of 8 elements), as mk.attention
    reasons = triton_reasons(q, head_dim=max(q.shape[-1], v.shape[-1]), max_head_dim=_TRITON_MAX_HEAD_DIM)
    return reasons + rotary_reasons(inp["rotary"], q, v)


def _triton_run(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
                scale, enable_gqa, rotary, out=None, scores=None):
    d, dv = query.shape[-1], value.shape[-1]
    seed = None
    if dropout_p > 0.0:
        # drawn from torch's generator of the tensors' device: torch.manual_seed replays it
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=query.device)
    # Dv != D: the kernels take one head dim, so the narrower side is zero-padded (zero columns
    # of Q/K add nothing to QKᵀ; zero columns of V give output columns that are sliced off), as
    # mk.attention does: a copy of that side per call, in a case VLMs rarely have
    if dv < d:
        value = F.pad(value, (0, d - dv))
    elif dv > d:
        query, key = F.pad(query, (0, dv - d)), F.pad(key, (0, dv - d))
    cos = sin = None
    if rotary is not None:
        cos, sin = rotary
        if cos.stride() != sin.stride():  # the kernel indexes both with cos's strides
            cos, sin = cos.contiguous(), sin.contiguous()
    args = (query, key, value, cu_seqlens_q, cu_seqlens_k, cos, sin, seed, max_seqlen_q, max_seqlen_k,
            float(dropout_p), bool(is_causal), float(scale))
    sc = None
    if scores is not None:  # the key importance accumulated by the forward kernel itself
        weights, reduce_heads = scores
        result, _, sc = _varlen_fwd_scores(*args, weights, "none" if reduce_heads is None else reduce_heads)
        result = result[..., :dv] if dv < d else result
    elif out is not None and dv >= d:  # the kernel writes the caller's buffer itself
        _varlen_fwd_out(*args, out)
        result = out
    else:
        result, _ = _varlen_fwd(*args)
        result = result[..., :dv] if dv < d else result
    if is_causal:
        result = _triton_nans(result, query, key, value[..., :dv], cu_seqlens_q, cu_seqlens_k, rotary,
                              inplace=out is not None)
    return _into(out, result) if scores is None else (_into(out, result), sc)


def _into(out, result):
    """``result``, copied into the caller's ``out`` when given and not already there."""
    if out is None or result is out:
        return result
    return out.copy_(result)


def _segments(cu: torch.Tensor, total: int):
    """(sequence id, local index) of each packed row, from device ops only."""
    idx = torch.arange(total, device=cu.device, dtype=cu.dtype)
    seg = torch.searchsorted(cu[1:], idx, right=True)
    return seg, idx - cu[seg]


def _sequence_nans(out, key_bad, value_bad, seg_q, seg_k, n: int, inplace: bool = False):
    """``out`` (total_q, Hq, Dv) with NaN where a per-sequence SDPA (math backend) has one from
    the sequence's own keys/values: every row of a sequence (kv head) holding a bad key row
    ``key_bad`` (total_k, Hkv), column d of every row of a sequence holding a bad value entry
    ``value_bad`` (total_k, Hkv, Dv).  ``n`` counts the sequences of :func:`safe_cu_seqlens`,
    whose last is the padding tail (its rows see no key: never NaN).  Device ops only
    (``index_add`` per sequence, a gather per row, one ``where``, or ``masked_fill_`` into
    ``out`` when ``inplace``)."""
    real = (torch.arange(n, device=out.device) < n - 1)[:, None]  # the tail's flags stay False
    seq_key_bad = (torch.zeros(n, key_bad.shape[1], dtype=torch.int32, device=out.device).index_add_(
        0, seg_k, key_bad.to(torch.int32)) > 0) & real
    seq_value_bad = (torch.zeros(n, *value_bad.shape[1:], dtype=torch.int32, device=out.device).index_add_(
        0, seg_k, value_bad.to(torch.int32)) > 0) & real[..., None]
    poisoned = seq_key_bad[seg_q][..., None] | seq_value_bad[seg_q]  # (total_q, Hkv, Dv)
    if poisoned.shape[1] != out.shape[1]:  # GQA: a kv head's flags go to its query heads
        poisoned = poisoned.repeat_interleave(out.shape[1] // poisoned.shape[1], dim=1)
    if inplace:
        return out.masked_fill_(poisoned, float("nan"))
    return torch.where(poisoned, float("nan"), out)


def _triton_nans(out, query, key, value, cu_q, cu_k, rotary, inplace=False):
    """Causal calls: the kernels skip the key tiles above each sequence's causal band, where
    SDPA math still adds a NaN key's logits (NaN + -inf = NaN) and multiplies a NaN value by a
    zero probability; the rule (every row of the sequence / column d of every row) is applied
    after the kernel from one pass over K and V (and cos/sin, which rotate the keys)."""
    total_q, total_k = query.shape[0], key.shape[0]
    cu_q, cu_k = safe_cu_seqlens(cu_q, total_q), safe_cu_seqlens(cu_k, total_k)
    key_bad = torch.isnan(key.amax(-1))  # (total_k, Hkv): NaN survives amax
    if rotary is not None:
        rot_bad = torch.isnan(rotary[0].amax(-1)) | torch.isnan(rotary[1].amax(-1))  # (total,)
        key_bad = key_bad | rot_bad[:, None]
    value_bad = torch.isnan(value)
    seg_q, _ = _segments(cu_q, total_q)
    seg_k, _ = _segments(cu_k, total_k)
    return _sequence_nans(out, key_bad, value_bad, seg_q, seg_k, cu_q.shape[0] - 1, inplace)


def _zero_anchor(*tensors: torch.Tensor) -> torch.Tensor:
    """0 that depends on ``tensors`` (an empty sum): added to an output computed without them, it
    gives each a zero gradient (not None) and never a NaN from their values."""
    return sum(t.flatten()[:0].sum() for t in tensors)


def _sdpa_run(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
              scale, enable_gqa, rotary, out=None, scores=None):
    """One SDPA call over the whole packing with a dense block-diagonal (total_q, total_k) mask,
    built on the device (no host read): O(total_q·total_k) memory, the automatic route only where
    the Triton kernels cannot run (CPU without the interpreter, float64, head dims over 256).

    Sequences stay independent under NaN/Inf: SDPA multiplies every masked probability (0) by
    its value, so one NaN anywhere in the packing would reach every row.  Non-finite key rows
    and value entries are zeroed for the call, and the rows of their own sequence get NaN back
    exactly where a per-sequence SDPA (math backend) has it: every row of a sequence with a
    non-finite key (that head), every row's column d of a sequence with a non-finite value in
    column d."""
    if rotary is not None:
        query, key = ref.apply_rotary(query, *rotary), ref.apply_rotary(key, *rotary)
    total_q, total_k = query.shape[0], key.shape[0]
    cu_q, cu_k = safe_cu_seqlens(cu_seqlens_q, total_q), safe_cu_seqlens(cu_seqlens_k, total_k)
    n = cu_q.shape[0] - 1
    seg_q, pos_q = _segments(cu_q, total_q)
    seg_k, pos_k = _segments(cu_k, total_k)
    allowed = (seg_q[:, None] == seg_k[None, :]) & (seg_q < n - 1)[:, None]  # the tail (padding) sees no key
    if is_causal:
        lens_q = cu_q[1:] - cu_q[:-1]
        lens_k = cu_k[1:] - cu_k[:-1]
        shift = (lens_k - lens_q)[seg_q]  # bottom-right alignment
        allowed &= pos_k[None, :] <= (pos_q + shift)[:, None]
    sc = None if scores is None else _reduce_heads(_dense_scores(query, key, allowed, scale, scores[0]), scores[1])
    key_bad = ~torch.isfinite(key).all(-1)  # (total_k, Hkv)
    value_bad = ~torch.isfinite(value)  # (total_k, Hkv, Dv)
    key = torch.where(key_bad[..., None], 0.0, key)
    value = torch.where(value_bad, 0.0, value)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    rep = q.shape[1] // k.shape[1]
    if rep != 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    result = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
    result = result.squeeze(0).transpose(0, 1)
    result = _sequence_nans(result, key_bad, value_bad, seg_q, seg_k, n)
    # rows that see no key: 0, whatever SDPA's backend gives for a fully masked row
    result = torch.where(allowed.any(1)[:, None, None], result, result.new_zeros(()))
    return _into(out, result) if scores is None else (_into(out, result), sc)


def _dense_scores(query, key, allowed, scale, weights):
    """(Hq, total_k) key importance of the sdpa route, from the probabilities themselves: the
    (Hq, total_q, total_k) softmax under the block-diagonal mask ``allowed`` (the memory SDPA's
    call takes anyway), rows weighted by ``weights`` (None: every row), in fp32 (fp64 for
    float64).  A row that sees no key adds 0; a NaN stays in its own sequence."""
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        q = query.detach().transpose(0, 1).to(acc)
        k = key.detach().transpose(0, 1).to(acc)
        if k.shape[0] != q.shape[0]:
            k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        p = torch.softmax(torch.matmul(q, k.transpose(1, 2)).mul_(scale).masked_fill_(~allowed, float("-inf")), -1)
        w = torch.ones(q.shape[1], dtype=acc, device=q.device) if weights is None else weights.to(acc)
        p = torch.where(allowed & (w != 0)[:, None], p, 0.0) * w[:, None]
        return p.sum(1)


def _reduce_heads(scores: torch.Tensor, reduce_heads):
    """(Hq, total_k) → (total_k,) for "mean" / "sum"; as is for None."""
    if reduce_heads == "mean":
        return scores.mean(0)
    if reduce_heads == "sum":
        return scores.sum(0)
    return scores


def _reference_run(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal,
                   scale, enable_gqa, rotary, out=None, scores=None):
    result = _into(out, ref.attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, dropout_p, is_causal,
                                             scale, enable_gqa, rotary))
    if scores is None:
        return result
    with torch.no_grad():
        sc = ref.attention_varlen_scores(query.detach(), key.detach(), cu_seqlens_q, cu_seqlens_k, is_causal, scale,
                                         rotary, scores[0])
    return result, _reduce_heads(sc, scores[1])


dispatch.register(dispatch.Backend("triton", "attention_varlen", _triton_check, _triton_run,
                                   description="fused Triton packed flash-attention (fwd + bwd, rotary fused)"))
dispatch.register(dispatch.Backend("sdpa", "attention_varlen", lambda inp: [], _sdpa_run,
                                   description="one SDPA call with a device-built block-diagonal mask"))
# sdpa accepts every call, so the reference (a host read per call) is reached only when forced
dispatch.register(dispatch.Backend("reference", "attention_varlen", lambda inp: [], _reference_run,
                                   description="plain PyTorch per-sequence loop (host sync; forced only)"))


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
    return_scores: dict | None = None,
    fp8: str | dict | tuple | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Attention over packed sequences of different lengths (``flash_attn_varlen_func``'s layout).

    Shapes: ``query`` (total_q, Hq, D), ``key`` (total_k, Hkv, D), ``value`` (total_k, Hkv, Dv)
    → (total_q, Hq, Dv).  ``cu_seqlens_q`` / ``cu_seqlens_k``: int32 (n+1,) prefix sums on the
    tensors' device (``cu[0] = 0``, ``cu[n] <= total``); rows ``cu_q[s]:cu_q[s+1]`` of the query
    attend only to rows ``cu_k[s]:cu_k[s+1]`` of the keys.  Sequences may be empty (length 0);
    a query row of a sequence with no key returns 0.  Rows past ``cu[n]`` are padding: query
    rows there return 0 (gradient 0), keys there are never read into a real row (gradient 0).
    Qwen2.5-VL's window attention is this op with the window prefix sums.  Hkv < Hq needs
    ``enable_gqa=True`` and Hq % Hkv == 0.

    ``out``: a (total_q, Hq, Dv) tensor of query's dtype and device (any strides, no internal
    overlap, not sharing memory with an input) that receives the result in place and is
    returned; inference only (an input that requires grad raises, as torch's ``out=``).

    **CUDA-graph capture contract** (what vLLM's encoder CUDA graphs and SGLang's ViT graph mode
    need; ``tests/test_capture_contract.py``): capture once with buffers sized for the largest
    batch, replay with new values written into the same tensors.

    * ``out=`` writes into the caller's buffer: the Triton kernel stores there directly (a copy
      only when Dv < D); no allocation's size depends on a tensor's *values* (every buffer the
      call allocates is sized from shapes and ``max_seqlen``), and nothing is read on the host.
    * Padded metadata gives bit-identical results for the real rows: trailing zero-length
      sequences (``cu_seqlens`` longer than the real count, its last value repeated), rows past
      ``cu[n]`` (unused tail rows of the buffers), and ``max_seqlen`` hints above the real lengths
      change nothing in the rows of the real sequences; the tail rows come out 0.
    * Whatever the values, the kernels read and write only inside the given tensors.

    No host synchronisation: nothing reads a device value on the host, so the call is
    CUDA-graph capturable and compiles with no graph break.  ``max_seqlen_q`` / ``max_seqlen_k``
    are optional upper bounds (as flash-attn's) of the real sequences' lengths (not of the
    padding tail) that only shrink the launch grid.  Bad values (``cu_seqlens_*`` not
    non-decreasing from 0, a last entry above the total, a length above its ``max_seqlen`` hint)
    raise ``ValueError`` in eager mode on CPU tensors; elsewhere (CUDA tensors,
    ``torch.compile``, CUDA-graph capture) a device-side assertion reports them at the next
    synchronising point, with no host sync.  Whatever the values, the kernels only read and
    write inside their tensors: they run on boundaries clamped to ``[0, total]`` and made
    non-decreasing (:func:`mmkernels._utils.safe_cu_seqlens`).

    ``is_causal`` is **bottom-right** aligned per sequence, like flash-attn's varlen kernels and
    what HF's flash path expects: row i sees key j iff j <= i + (Lk − Lq).  Lq=3, Lk=5 and
    Lq=5, Lk=3 (rows 0 and 1 see nothing and return 0)::

        1 1 1 0 0        0 0 0
        1 1 1 1 0        0 0 0
        1 1 1 1 1        1 0 0
                         1 1 0
                         1 1 1

    ``rotary=(cos, sin)``: Qwen2-VL / Qwen2.5-VL / Qwen3-VL's vision RoPE, applied to query and
    key (on Triton by one pre-pass kernel, before the plain attention loops) exactly as
    ``apply_rotary_pos_emb_vision`` (rotate-half convention, fp32 math, rounded back to the input
    dtype); the backward rotates the gradients back.  cos
    and sin are (total, D), or (total, D/2) standing for ``cat((c, c), -1)``, indexed by the
    packed row and shared by query and key (so total_q must equal total_k); they get no
    gradient.

    ``return_scores=dict(query_index=..., reduce_heads=...)``: returns ``(out, scores)``, the key
    importance that VisionZip / VisPruner-style pruning reads — :func:`mmkernels.attention_scores`'
    convention applied per packed sequence: for each key j of sequence s, the sum over the
    selected query rows i of **its own sequence** of the softmax probabilities P[i, j] (before
    dropout), heads averaged (``reduce_heads="mean"``, default: (total_k,) float32), summed
    (``"sum"``) or kept (``None``: (Hq, total_k)); float64 for float64 inputs (sdpa / reference).
    ``query_index``: None (every row of each sequence: divide by the sequence length for the mean
    over rows), an int, or a list / 1-D integer tensor of rows **local to each sequence** (``0`` =
    each sequence's first row, e.g. a CLS token; ``-1`` its last), a row listed twice counting
    twice; an index outside a (shorter) sequence selects nothing there.  Rows that see no key, and
    the padding rows and keys past ``cu_seqlens[-1]``, give 0.  A NaN stays inside its sequence.

    On Triton the scores come from the forward kernel itself (one launch, exact, no second QKᵀ
    launch, the head dim at its real size — 72/80/88 are not padded to 128): once a query tile's
    key loop has its rows' final max and sum, the program visits the same keys again with its Q
    tile still in registers, rebuilds P = exp(S − m) / l for that tile only and adds its column
    sums into a zero-initialised fp32 buffer with ``atomic_add`` — one extra Q Kᵀ per tile (no V,
    no P·V: about half the forward's FLOPs again for every row with ``query_index=None``), and
    with a ``query_index`` only the tiles holding a selected row run it (one row of each
    sequence: about 1/ceil(L/BLOCK_M) of that).  Memory: the scores themselves (4·total_k bytes,
    or 4·Hq·total_k), plus 4·total_q bytes of row weights with a ``query_index``.
    Determinism: the atomic sums' order varies between runs on a GPU (fp32 rounding differences
    of ~1 ulp per add); runs are bit-identical in the interpreter and on the sdpa / reference
    routes.  The sdpa route computes the (Hq, total_q, total_k) probabilities (as its attention
    call does), the reference route loops over the sequences (host sync).  The scores never
    carry a gradient; ``out`` stays differentiable (the backward is the plain one).  With
    ``out=``, the result is copied into it.

    ``scale`` defaults to 1/sqrt(D).  ``dropout_p > 0``: Philox dropout seeded from torch's
    generator (``torch.manual_seed`` replays it; the backward regenerates the same mask).
    ``backend``: None (auto), "triton", "sdpa" (one SDPA call with a dense block-diagonal mask
    built on the device: O(total_q·total_k) memory) or "reference" (per-sequence loop with a
    host read; only when forced).  Dtypes: float16, bfloat16, float32 on Triton; float64 on
    the others.  Head dims: any up to 256 on Triton (one that is not a multiple of 8 is
    zero-padded in registers, not in memory, and loads without the 16-byte alignment hint).

    Equivalent PyTorch::

        outs = []
        for s in range(len(cu_seqlens_q) - 1):
            q = query[cu_seqlens_q[s]:cu_seqlens_q[s + 1]].transpose(0, 1)
            k = key[cu_seqlens_k[s]:cu_seqlens_k[s + 1]].transpose(0, 1)
            v = value[cu_seqlens_k[s]:cu_seqlens_k[s + 1]].transpose(0, 1)
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(k.shape[1] - q.shape[1])
            outs.append(F.scaled_dot_product_attention(q, k, v, mask if is_causal else None,
                        dropout_p, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
        out = torch.cat(outs)       # (with rotary: q, k = apply_rotary_pos_emb_vision(q, k, cos, sin) first)

    ``fp8`` (keyword only; inference): the e4m3 forward on sm_89+ / sm_90 (docs/fp8.md).
    ``"dynamic"``: float16/bfloat16 inputs quantised per head over the packing by a fused pre-pass
    (rotary applied first); ``dict(q_descale=, k_descale=, v_descale=)`` (or a tuple):
    float8_e4m3fn inputs with float32 descales of shape () or (H,) (Hq for q, Hkv for k, v).
    Output ``out_dtype`` (default: the input dtype for "dynamic", bfloat16 for float8 inputs);
    fallback as :func:`mmkernels.attention`'s.
    """
    if fp8 is not None:
        from .attention_fp8 import attention_varlen_fp8

        if return_scores is not None:
            raise ValueError("return_scores: not available with fp8 (the e4m3 forward keeps no key scores); "
                             "drop fp8 to get them")
        return attention_varlen_fp8(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p, is_causal, scale, enable_gqa, rotary, fp8=fp8, out_dtype=out_dtype,
                                    out=out, backend=backend)
    if out_dtype is not None:
        raise ValueError("out_dtype: only with fp8 (the other paths return the inputs' dtype)")
    _validate(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
              enable_gqa, rotary)
    _check_out(out, query, value, (query, key, value, *(rotary or (None, None)), cu_seqlens_q, cu_seqlens_k))
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    request = None
    if return_scores is not None:
        query_index, reduce_heads = _scores_request(return_scores, query)
        request = (score_row_weights(query_index, cu_seqlens_q, query.shape[0]), reduce_heads)
    inputs = Inputs(query=query, key=key, value=value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=float(dropout_p),
                    is_causal=bool(is_causal), scale=float(scale), enable_gqa=bool(enable_gqa),
                    rotary=tuple(rotary) if rotary is not None else None, out=out, scores=request)
    chosen = dispatch.select("attention_varlen", inputs, backend)
    if not _host_checks_values(cu_seqlens_q):  # (CPU eager: checked by _validate)
        if chosen.name == "reference":  # this route reads cu_seqlens on the host anyway
            _check_cu_values("cu_seqlens_q", cu_seqlens_q, query.shape[0], max_seqlen_q)
            _check_cu_values("cu_seqlens_k", cu_seqlens_k, key.shape[0], max_seqlen_k)
        else:
            _report_bad_cu_seqlens(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0], max_seqlen_q,
                                   max_seqlen_k)
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        # nothing to compute on any route (no rows, keys or heads, or Dv = 0; D = 0 is rejected):
        # rows that see no key are 0, and every input gets a zero gradient
        if out is not None:
            result = out.zero_()
        else:
            result = query.new_zeros(query.shape[0], query.shape[1], value.shape[-1]) + _zero_anchor(query, key, value)
        if request is None:
            return result
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        sc = torch.zeros(query.shape[1], key.shape[0], dtype=acc, device=query.device)
        return result, _reduce_heads(sc, request[1])
    return chosen.run(**inputs)
