"""timm integration: ``timm.layers.attention.Attention`` (VisionTransformer, EVA without RoPE, ...)
on :func:`mmkernels.attention`.

timm is optional (it needs torchvision); nothing here imports it.  :func:`is_timm_attention`
recognises the module by class and attributes, and :func:`attention_forward` is the replacement
``forward`` that :func:`mmkernels.patch` binds on the instance (parameters untouched).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.attention import attention

__all__ = ["attention_forward", "is_timm_attention"]

_REQUIRED = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop", "num_heads", "head_dim")


def is_timm_attention(module: nn.Module) -> bool:
    """Whether ``module`` is timm's standard ``Attention`` (fused qkv Linear, optional q/k norms)."""
    cls = type(module)
    return (cls.__name__ == "Attention" and cls.__module__.startswith("timm.")
            and all(hasattr(module, a) for a in _REQUIRED))


def attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` with the attention core on :func:`mmkernels.attention`:
    x (B, N, C) → (B, N, dim_out); ``attn_mask`` SDPA-style (bool True = attend, or additive)."""
    b, n, _ = x.shape
    h, d = self.num_heads, self.head_dim
    attn_dim = getattr(self, "attn_dim", h * d)
    gate = getattr(self, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        attn_mask = attn_mask.to(q.dtype)
    out = attention(q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
                    is_causal=is_causal, scale=getattr(self, "scale", None))
    out = out.transpose(1, 2).reshape(b, n, attn_dim)
    norm = getattr(self, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return self.proj_drop(self.proj(out))
