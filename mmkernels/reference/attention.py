"""Plain-PyTorch attention with SDPA semantics (ground truth in tests, baseline in benchmarks).

Works in any floating dtype, float64 included, on any device.  Differences from
``torch.nn.functional.scaled_dot_product_attention``: none in value, except that a query row
whose keys are all masked out returns exactly 0 (SDPA's math path does so too in recent
torch releases; older ones gave NaN).  NaN propagates as in SDPA's math path: masks are added
as -inf, so a NaN logit stays NaN where it is masked (the rule of ``mk.attention``'s docstring).
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "attention_probs"]


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """softmax(QKᵀ·scale + mask) of shape (B, Hq, Lq, Lk); fully masked rows are 0."""
    lq, lk, d = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if enable_gqa and query.shape[-3] != key.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    allowed = None
    if is_causal:
        # top-left aligned: query i sees keys j <= i (SDPA's convention, also for Lq != Lk)
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
    if allowed is not None:
        # added as -inf, not filled (SDPA's math does the same): a NaN logit stays NaN where it is
        # masked (NaN in k, +inf in a float mask above the causal diagonal) — the NaN rule of
        # ``mk.attention``; finite logits get exactly -inf either way
        scores = scores + torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
            ~allowed, float("-inf"))
    if lk == 0:  # no keys: every row is fully masked (its P·V is then an empty sum, 0)
        return scores
    row_max = scores.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    # a row with every key masked has max -inf: shift by 0 instead, its exp() is then all 0
    scores = scores - torch.where(dead, torch.zeros_like(row_max), row_max)
    p = torch.exp(scores)
    denom = p.sum(dim=-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hq, Lq, D) = dropout(softmax(QKᵀ·scale + mask)) · V, in the inputs' dtype.

    ``dropout_mask`` (bool, broadcastable to (B, Hq, Lq, Lk), True = keep) replaces the random
    draw, so tests can replay a kernel's mask exactly.
    """
    p = attention_probs(query, key, attn_mask, is_causal, scale, enable_gqa)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p)
    if enable_gqa and query.shape[-3] != value.shape[-3]:
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    return torch.matmul(p, value)
