"""``mmkernels.attention_scores``: how much attention each key receives, in O(L) memory.

Layers: validation (``ValueError`` naming the argument) and normalisation of ``query_index``
into row numbers / of ``lse`` into the kernel's statistics → dispatch (triton | reference, see
:mod:`mmkernels.dispatch`) → for Triton, the ``torch.library`` op ``mmkernels::attention_scores``
with ``register_fake`` (so ``torch.compile(fullgraph=True)`` traces through).

Not differentiable: scores feed a top-k (token pruning), which has no gradient; the inputs are
detached and the result never requires grad.
"""

from __future__ import annotations

import math
from typing import Optional, TypedDict

import torch

from .. import dispatch
from .._utils import broadcasts_to, check_gqa_heads, describe, triton_reasons
from ..reference import attention_scores as ref

__all__ = ["attention_scores", "query_rows"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
REDUCE_HEADS = ("mean", "sum", None)


class Inputs(TypedDict):
    """What every backend receives (``check(inputs)``, ``run(**inputs)``), built once per call:
    query/key detached, ``rows`` the selected query rows (B, n), ``stats`` the kernel's row
    statistics from ``lse`` or None, the scale resolved."""

    query: torch.Tensor
    key: torch.Tensor
    rows: torch.Tensor
    stats: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    is_causal: bool
    scale: float


# --------------------------------------------------------------------------------------
# torch.library op (Triton path)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("mmkernels::attention_scores", mutates_args=())
def _attention_scores_op(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    stats: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
) -> torch.Tensor:
    from ..kernels import attention_scores as kernels

    return kernels.attention_scores(query, key, rows, stats, attn_mask, is_causal, scale)


@_attention_scores_op.register_fake
def _(query, key, rows, stats, attn_mask, is_causal, scale):
    b, h = query.shape[:2]
    return query.new_empty(b, h, key.shape[2], dtype=torch.float32)  # contiguous, as the kernel writes it


# --------------------------------------------------------------------------------------
# argument normalisation
# --------------------------------------------------------------------------------------
def query_rows(query_index, batch: int, lq: int, device) -> torch.Tensor:
    """``query_index`` (None | int | slice | (B, n) or (n,) integer tensor, negatives counted
    from the end) → (B, n) int64 row numbers in [0, Lq) on ``device``.  Raises ``ValueError``
    for an index out of range, an empty selection, or a tensor of the wrong shape/dtype."""
    if query_index is None:
        return torch.arange(lq, device=device).expand(batch, lq)
    if isinstance(query_index, bool):
        raise ValueError(f"query_index: expected None, an int, a slice or an index tensor, got {query_index!r}")
    if isinstance(query_index, int):
        if not -lq <= query_index < lq:
            raise ValueError(f"query_index: {query_index} is out of range for Lq={lq} (expected -{lq} <= i < {lq})")
        return torch.full((batch, 1), query_index % lq, dtype=torch.int64, device=device)
    if isinstance(query_index, slice):
        start, stop, step = query_index.indices(lq)
        n = len(range(start, stop, step))
        if n == 0:
            raise ValueError(f"query_index: slice {query_index} selects no rows of Lq={lq}")
        return (torch.arange(n, device=device) * step + start).expand(batch, n)
    if isinstance(query_index, torch.Tensor):
        idx = query_index
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"query_index: expected an integer tensor, got {describe(idx)}")
        if idx.dim() == 1:
            idx = idx.unsqueeze(0).expand(batch, -1)
        if idx.dim() != 2 or idx.shape[0] != batch or idx.shape[1] == 0:
            raise ValueError(f"query_index: expected an index tensor of shape (B={batch}, n >= 1) or (n,), "
                             f"got {describe(query_index)}")
        idx = idx.to(device)
        if not torch.compiler.is_compiling():  # a host read: checked eagerly, trusted inside a graph
            lo, hi = int(idx.min()), int(idx.max())
            if lo < -lq or hi >= lq:
                raise ValueError(f"query_index: values must lie in [-{lq}, {lq}) for Lq={lq}, got min {lo}, max {hi} "
                                 f"({describe(query_index)})")
        idx = idx.to(torch.int64)
        return torch.where(idx < 0, idx + lq, idx)
    raise ValueError(f"query_index: expected None, an int, a slice or an index tensor, "
                     f"got {type(query_index).__name__}")


def _stats_from_lse(lse: torch.Tensor, rows: torch.Tensor, b: int, h: int, lq: int) -> torch.Tensor:
    """The kernel's (B, H, 2, n) fp32 base-2 (row max, log2 row sum) of the selected rows."""
    n = rows.shape[1]
    if lse.dim() == 4:  # mmkernels' own statistics: (B, H, 2, Lq)
        return torch.gather(lse.float(), 3, rows[:, None, None, :].expand(b, h, 2, n)).contiguous()
    nat = torch.gather(lse.float(), 2, rows[:, None, :].expand(b, h, n))
    # natural-log LSE: max2 = lse·log2(e) with a log2 sum of 0; a non-finite value (flash-attn
    # writes +inf, others -inf, for a row with no visible key) becomes the "empty row" +inf
    m = torch.where(torch.isfinite(nat), nat * _LOG2E, torch.full_like(nat, float("inf")))
    return torch.stack((m, torch.zeros_like(m)), dim=2).contiguous()


def _validate(query, key, lse, attn_mask, is_causal, scale, enable_gqa, reduce_heads) -> None:
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, H, L, D), got {describe(t)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {describe(t)}")
    if key.dtype != query.dtype or key.device != query.device:
        raise ValueError(f"key: expected dtype {query.dtype} on {query.device} like query, got {describe(key)}")
    b, hq, lq, d = query.shape
    if d == 0:
        raise ValueError(f"query: expected a head dim D >= 1 in (B, H, L, D) (D = 0 gives no logits and no "
                         f"default scale 1/sqrt(D)), got {describe(query)}")
    if key.shape[0] != b or key.shape[-1] != d:
        raise ValueError(f"key: expected (B={b}, Hkv, Lk, D={d}) like query {describe(query)}, got {describe(key)}")
    check_gqa_heads(hq, key.shape[1], enable_gqa, key)
    if lse is not None:
        if not isinstance(lse, torch.Tensor) or not lse.dtype.is_floating_point:
            raise ValueError(f"lse: expected a floating tensor or None, got "
                             f"{describe(lse) if isinstance(lse, torch.Tensor) else type(lse).__name__}")
        if tuple(lse.shape) not in ((b, hq, lq), (b, hq, 2, lq)) or lse.device != query.device:
            raise ValueError(f"lse: expected (B, H, Lq) = {(b, hq, lq)} natural-log log-sum-exp or mmkernels' "
                             f"(B, H, 2, Lq) = {(b, hq, 2, lq)} statistics on {query.device}, got {describe(lse)}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"attn_mask: expected a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise ValueError(f"attn_mask: expected dtype torch.bool (True = attend), or an additive float32 or "
                             f"{query.dtype} mask, got {describe(attn_mask)}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask: expected device {query.device}, got {describe(attn_mask)}")
        target = (b, hq, lq, key.shape[2])
        if not broadcasts_to(attn_mask, target):
            raise ValueError(f"attn_mask: expected a shape broadcastable to (B, H, Lq, Lk) = {target}, "
                             f"got {describe(attn_mask)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a float or None, got {type(scale).__name__}")
    if reduce_heads not in REDUCE_HEADS:
        raise ValueError(f"reduce_heads: expected 'mean', 'sum' or None, got {reduce_heads!r}")


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _triton_check(inp: Inputs) -> list:
    q = inp["query"]
    return triton_reasons(q, head_dim=q.shape[-1], min_head_dim=1, max_head_dim=_TRITON_MAX_HEAD_DIM,
                          nonempty=(q, inp["key"]))


def _triton_run(query, key, rows, stats, attn_mask, is_causal, scale):
    return _attention_scores_op(query, key, rows, stats, attn_mask, is_causal, scale)


def _reference_run(query, key, rows, stats, attn_mask, is_causal, scale):
    return ref.attention_scores(query, key, rows, attn_mask, is_causal, scale)


dispatch.register(dispatch.Backend("triton", "attention_scores", _triton_check, _triton_run,
                                   description="Triton softmax column sums from the row statistics"))
dispatch.register(dispatch.Backend("reference", "attention_scores", lambda inp: [], _reference_run,
                                   description="plain PyTorch, row chunks (mmkernels.reference.attention_scores)"))


def _reduce(scores: torch.Tensor, reduce_heads):
    if reduce_heads == "mean":
        return scores.mean(1)
    if reduce_heads == "sum":
        return scores.sum(1)
    return scores


def _run_scores(query, key, rows, stats, attn_mask, is_causal, scale, backend):
    if key.shape[2] == 0:
        # no keys (Lk = 0): nothing receives attention, the scores are the empty (B, H, 0) tensor
        # (as mk.attention returns zeros for rows with no key); no backend runs, a forced one is
        # still checked by name
        dispatch.forced_backend(backend)
        b, h = query.shape[:2]
        return query.new_zeros(b, h, 0, dtype=torch.float64 if query.dtype == torch.float64 else torch.float32)
    inputs = Inputs(query=query, key=key, rows=rows, stats=stats, attn_mask=attn_mask, is_causal=bool(is_causal),
                    scale=float(scale))
    return dispatch.select("attention_scores", inputs, backend).run(**inputs)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    lse: torch.Tensor | None = None,
    *,
    query_index=None,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    reduce_heads: str | None = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    r"""Attention mass each key receives from selected query rows: softmax column sums.

    ``scores[b, (h,) j] = Σ_{i ∈ query_index} softmax(Q Kᵀ·scale + mask)[b, h, i, j]`` — what
    FastV / VisionZip / PruMerge read from eager ``output_attentions=True``, here without ever
    forming the (B, H, Lq, Lk) matrix: the Triton path keeps O(n + Lk) state per (batch, head)
    and streams QKᵀ tile by tile.

    Shapes: ``query`` (B, Hq, Lq, D), ``key`` (B, Hkv, Lk, D) (Hkv < Hq needs ``enable_gqa``)
    → (B, Lk) with ``reduce_heads="mean"`` (default, heads averaged) or ``"sum"``, (B, Hq, Lk)
    with ``reduce_heads=None``.  Output float32 (float64 for float64 inputs), never requiring
    grad: the op is not differentiable (scores feed a top-k).

    ``query_index``: which rows are summed —
    ``None`` all Lq rows (SigLIP-style mean attention: divide by Lq), an ``int`` (``0`` = CLS,
    ``-1`` = the last token, FastV), a ``slice``, or an integer tensor (B, n) (per sample) or
    (n,) (every sample) with values in [-Lq, Lq); a row listed twice counts twice.

    ``attn_mask`` / ``is_causal`` / ``scale`` / ``enable_gqa``: exactly as in
    :func:`mmkernels.attention` (bool True = attend, or additive float; broadcastable to
    (B, Hq, Lq, Lk); causal top-left aligned).  A selected row whose keys are all masked adds 0::

        query_index=-1, Lq=3, Lk=5, is_causal=True     row 2 sees keys 0 1 2 → scores[3:] = 0

    No keys (Lk = 0) gives the empty result, (B, 0) / (B, Hq, 0); a head dim D = 0 raises
    ``ValueError`` (there are no logits, and no default scale).

    ``lse``: the row statistics of a forward over the same query/key/mask, so the Triton path
    skips its own softmax pass.  Two forms: (B, Hq, Lq) natural-log log-sum-exp (flash-attn's
    ``softmax_lse``; a non-finite value, e.g. flash-attn's +inf, marks a row with no visible key), or mmkernels' own
    (B, Hq, 2, Lq) float32 statistics (``[..., 0, :]`` the base-2 row max, ``[..., 1, :]`` log2 of
    the row sum, +inf max for an empty row — the second output of ``torch.ops.mmkernels.
    attention_fwd``), exact even for rows whose logits all sit on HF's ``finfo.min`` floor.  For
    one call that returns both output and scores use ``mk.attention(..., return_scores=...)``.
    Without ``lse`` the kernel first computes the statistics of the selected rows only.  The
    reference backend (CPU without the interpreter, float64) holds whole rows and ignores ``lse``.

    Equivalent PyTorch (materialises the full matrix)::

        p = torch.softmax(q @ k.transpose(-2, -1) * scale + mask, dim=-1)   # (B, H, Lq, Lk)
        scores = p[:, :, rows, :].sum(2).mean(1)                             # (B, Lk)
    """
    _validate(query, key, lse, attn_mask, is_causal, scale, enable_gqa, reduce_heads)
    b, h, lq, d = query.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    rows = query_rows(query_index, b, lq, query.device)
    stats = _stats_from_lse(lse.detach(), rows, b, h, lq) if lse is not None else None
    scores = _run_scores(query.detach(), key.detach(), rows, stats,
                         attn_mask.detach() if attn_mask is not None else None, is_causal, scale, backend)
    return _reduce(scores, reduce_heads)
