"""Inputs and the float64 reference shared by the token_pool tests (Triton and CUDA)."""

from __future__ import annotations

import torch
from conftest import DEVICE

from mmkernels.reference.token_pool import token_pool as ref_token_pool


def tokens(b, n, c, dtype=torch.float32, layout="contiguous", device=DEVICE):
    """(B, N, C) tokens; ``slice``: a misaligned window of wider rows; ``transposed``: a (B, C, N)
    buffer's view (channel stride N)."""
    if layout == "slice":
        x = torch.randn(b, n, c + 13, device=device, dtype=dtype)[..., 5:5 + c]
    elif layout == "transposed":
        x = torch.randn(b, c, n, device=device, dtype=dtype).transpose(1, 2)
    else:
        x = torch.randn(b, n, c, device=device, dtype=dtype)
    return x.requires_grad_()


def norm_params(width, dtype, weight=True, bias=True, device=DEVICE):
    w = (1 + 0.5 * torch.randn(width, device=device, dtype=dtype)).requires_grad_() if weight else None
    b = (0.5 * torch.randn(width, device=device, dtype=dtype)).requires_grad_() if bias else None
    return w, b


def reference(x, w, b, do, cast, kw):
    """Reference output and the gradients of (x, weight, bias) — those that exist — in ``cast``."""
    leaves = [t.detach().to(cast).requires_grad_() if t is not None else None for t in (x, w, b)]
    out = ref_token_pool(leaves[0], norm_weight=leaves[1], norm_bias=leaves[2], **kw)
    wrt = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, wrt, do.to(cast))
