"""Plain-PyTorch attention scores (softmax column sums over selected query rows).

Ground truth in tests (float64) and the CPU backend of :func:`mmkernels.attention_scores`.  It
works on blocks of ``chunk`` selected rows, so its memory is O(chunk · Lk) per (batch, head),
never the (B, H, Lq, Lk) matrix of eager ``output_attentions``; a whole row is in memory at a
time, so it needs no log-sum-exp from a forward.
"""

from __future__ import annotations

import torch

__all__ = ["attention_scores"]


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    chunk: int = 256,
) -> torch.Tensor:
    """(B, Hq, Lk) = Σ over the selected rows of softmax(QKᵀ·scale + mask); fully masked rows add 0.

    ``rows`` (B, n) int64 row numbers in [0, Lq); ``attn_mask`` bool (True = attend) or additive,
    broadcastable to (B, Hq, Lq, Lk); ``is_causal`` top-left aligned (row i sees keys j <= i).
    Output float32, float64 for float64 inputs.  GQA: Hkv divides Hq, query head h reads key
    head h // (Hq // Hkv).
    """
    b, hq, lq, d = query.shape
    lk = key.shape[2]
    acc_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    if key.shape[1] != hq:
        key = key.repeat_interleave(hq // key.shape[1], dim=1)
    out = torch.zeros(b, hq, lk, dtype=acc_dtype, device=query.device)
    mask = None
    if attn_mask is not None:
        mask = attn_mask
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = mask.expand(b, hq, lq, lk)
    kt = key.to(acc_dtype).transpose(-2, -1)
    cols = torch.arange(lk, device=query.device)
    for start in range(0, rows.shape[1], chunk):
        r = rows[:, start:start + chunk]                                   # (B, c)
        q = torch.gather(query, 2, r[:, None, :, None].expand(b, hq, r.shape[1], d)).to(acc_dtype)
        s = torch.matmul(q, kt) * scale                                    # (B, H, c, Lk)
        allowed = torch.ones_like(s, dtype=torch.bool)
        if is_causal:
            allowed = allowed & (cols[None, None, None, :] <= r[:, None, :, None])
        if mask is not None:
            m = torch.gather(mask, 2, r[:, None, :, None].expand(b, hq, r.shape[1], lk))
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                s = s + m.to(acc_dtype)
        s = s.masked_fill(~allowed, float("-inf"))
        row_max = s.amax(-1, keepdim=True)
        # a row with every key masked: shift by 0 so its exp() is all 0 and it adds nothing
        p = torch.exp(s - torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max))
        denom = p.sum(-1, keepdim=True)
        out += (p / torch.where(denom == 0, torch.ones_like(denom), denom)).sum(2)
    return out
