"""Plain-PyTorch packed (variable-length) attention, float64-capable: the ground truth of
:func:`mmkernels.attention_varlen` in tests.

:func:`attention_varlen` loops over the sequences on the host (it reads ``cu_seqlens`` with
``tolist()``): simple and obviously right, but a host sync — it is never an automatic route on a
GPU (see :mod:`mmkernels.ops.attention_varlen`).  :func:`apply_rotary` is HF Qwen2-VL's
``apply_rotary_pos_emb_vision`` for one packed tensor.
"""

from __future__ import annotations

import math

import torch

from . import rotary
from .attention import attention_probs

__all__ = ["apply_rotary", "attention_varlen", "attention_varlen_scores"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen2-VL's ``apply_rotary_pos_emb_vision`` on packed x (total, H, D) with cos/sin (total, D)
    or (total, D/2): fp32 math, result in x's dtype."""
    return rotary.apply_rotary(x, cos.unsqueeze(-2), sin.unsqueeze(-2))


def attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(total_q, Hq, Dv): per sequence s, softmax(Q_s K_sᵀ·scale)·V_s in the inputs' dtype.

    ``is_causal`` is bottom-right aligned: row i sees key j iff j <= i + (Lk_s − Lq_s); rows that
    see no key are 0, and so are the rows past ``cu_seqlens_q[-1]`` (padding).  ``dropout_mask``
    (Hq, total_q, total_k) bool (True = keep; only the diagonal blocks are read) replaces the
    random draw so a kernel's mask can be replayed.
    """
    if rotary is not None:
        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for s in range(len(cq) - 1):
        q = query[cq[s]:cq[s + 1]].transpose(0, 1)
        k = key[ck[s]:ck[s + 1]].transpose(0, 1)
        v = value[ck[s]:ck[s + 1]].transpose(0, 1)
        lq, lk = q.shape[1], k.shape[1]
        if lq == 0:
            continue
        if lk == 0:
            outs.append(query.new_zeros(lq, query.shape[1], value.shape[-1]))
            continue
        mask = None
        if is_causal:
            mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        p = attention_probs(q, k, mask, False, scale, enable_gqa)
        if dropout_mask is not None:
            keep = dropout_mask[:, cq[s]:cq[s + 1], ck[s]:ck[s + 1]]
            p = p * keep.to(p.dtype) / (1.0 - dropout_p)
        elif dropout_p > 0.0:
            p = torch.nn.functional.dropout(p, dropout_p)
        if enable_gqa and v.shape[0] != q.shape[0]:
            v = v.repeat_interleave(q.shape[0] // v.shape[0], dim=0)
        outs.append(torch.matmul(p, v).transpose(0, 1))
    if not outs:
        # an empty sum keeps the graph (zero gradients) without 0 * NaN
        return query.new_zeros(query.shape[0], query.shape[1], value.shape[-1]) + query.flatten()[:0].sum()
    if query.shape[0] > cq[-1]:  # rows past the last boundary (a CUDA-graph buffer's padding) see no key
        outs.append(query.new_zeros(query.shape[0] - cq[-1], query.shape[1], value.shape[-1]))
    return torch.cat(outs, 0)


def attention_varlen_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    is_causal: bool = False,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    row_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Hq, total_k) key importance: per sequence s and key j of s, Σ_i w_i · softmax(Q_s K_sᵀ·scale)[i, j]
    over the query rows i of s (``row_weights`` (total_q,) w, None = 1 for every row), in fp32
    (fp64 for float64 inputs); causal bottom-right as :func:`attention_varlen`; rows that see no
    key, keys of no sequence (padding) and empty sequences give 0.  GQA: query head h reads key
    head h // (Hq // Hkv)."""
    if rotary is not None:
        query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    h = query.shape[1]
    out = torch.zeros(h, key.shape[0], dtype=acc, device=query.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        q = query[cq[s]:cq[s + 1]].transpose(0, 1).to(acc)
        k = key[ck[s]:ck[s + 1]].transpose(0, 1).to(acc)
        lq, lk = q.shape[1], k.shape[1]
        if lq == 0 or lk == 0:
            continue
        if k.shape[0] != h:
            k = k.repeat_interleave(h // k.shape[0], dim=0)
        logits = torch.matmul(q, k.transpose(1, 2)) * scale
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if is_causal:
            visible = visible.tril(diagonal=lk - lq)
        p = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
        w = torch.ones(lq, dtype=acc, device=q.device) if row_weights is None else row_weights[cq[s]:cq[s + 1]].to(acc)
        p = torch.where(visible & (w != 0)[:, None], p, 0.0) * w[:, None]
        out[:, ck[s]:ck[s + 1]] = p.sum(1)
    return out
