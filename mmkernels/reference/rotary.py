"""The vision rotary embedding in plain PyTorch: Qwen2-VL's ``apply_rotary_pos_emb_vision`` for
one tensor (rotate-half convention, fp32 math, result in the input's dtype)."""

from __future__ import annotations

import torch

__all__ = ["apply_rotary", "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) → (−x2, x1) over the last dim's halves."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin computed in fp32 (float64 stays float64), returned in x's dtype.

    ``cos``/``sin`` broadcast against ``x`` and have D columns, or D/2 standing for
    ``cat((c, c), -1)``."""
    if cos.shape[-1] * 2 == x.shape[-1]:
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(work)
    return (xf * cos.to(work) + rotate_half(xf) * sin.to(work)).to(x.dtype)
