"""Plain-PyTorch Q-Former cross-attention (BLIP-2 / InstructBLIP), float64-capable.

Equals HF ``Blip2QFormerMultiHeadAttention`` in cross-attention mode up to the context
layer (before the output dense): Q = Linear(hidden_states), K, V = Linear(encoder_hidden_states),
softmax(QKᵀ·scale + mask)·V with heads merged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attention

__all__ = ["merge_heads", "normalize_encoder_mask", "project_heads", "qformer_cross_attention"]


def normalize_encoder_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The op's mask forms, as an SDPA mask broadcastable to (B, H, Lq, Lk).

    * (B, Lk) — a padding mask, 1/True = keep (as ``encoder_attention_mask`` is given to HF's
      Q-Former model): becomes bool (B, 1, 1, Lk);
    * 3-D/4-D — SDPA semantics: bool True = attend, float = additive (HF's extended mask).
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        keep = mask if mask.dtype == torch.bool else mask != 0
        return keep[:, None, None, :]
    if mask.dtype == torch.bool:
        return mask
    return mask.to(dtype)


def project_heads(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                  num_heads: int):
    """Q, K, V as (B, H, L, d) views of three ``F.linear`` projections, each expanded to the
    broadcast batch (a batch of 1 on either side broadcasts over the other)."""
    bq, lq = hidden_states.shape[:2]
    bk, lk = encoder_hidden_states.shape[:2]
    b = max(bq, bk)

    def heads(t, batch, length):
        # the head width is explicit: with an empty batch or length, view(..., -1) is ambiguous
        return t.view(batch, length, num_heads, t.shape[-1] // num_heads).transpose(1, 2).expand(b, -1, -1, -1)

    return (heads(F.linear(hidden_states, q_weight, q_bias), bq, lq),
            heads(F.linear(encoder_hidden_states, k_weight, k_bias), bk, lk),
            heads(F.linear(encoder_hidden_states, v_weight, v_bias), bk, lk))


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, H, L, d) → (B, L, H·d)."""
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


def qformer_cross_attention(
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    num_heads: int,
    encoder_attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Lq, Dq) context; a KV batch of 1 broadcasts over the query batch (as HF's matmuls do).

    ``dropout_mask`` (bool (B, H, Lq, Lk), True = keep) replays a kernel's dropout draw.
    """
    q, k, v = project_heads(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                            v_weight, v_bias, num_heads)
    mask = normalize_encoder_mask(encoder_attention_mask, q.dtype)
    out = attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, dropout_mask=dropout_mask)
    return merge_heads(out)
