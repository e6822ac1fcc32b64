"""Qwen-VL family vision attention on one :func:`mmkernels.attention_varlen` call per layer.

transformers (5.x) runs these vision towers on one packed sequence of every image and video
frame, with ``cu_seqlens`` prefix sums (per image, or per 64-token window in Qwen2.5-VL's
windowed blocks).  Its attention module applies the vision RoPE in two extra passes over q and k
(``apply_rotary_pos_emb_vision``), then either calls a flash varlen kernel (after reading
``max(cu_seqlens)`` on the host when no hint is given) or, for every other implementation,
splits q/k/v on the host (``lengths.tolist()``) and calls attention once per image/window.
Neither the attention interface nor the mask interface sees the RoPE, so the hook is the
module's ``forward``: :func:`qwen_vision_attention_forward` replaces it on the instance (what
:func:`mmkernels.patch` does) and runs qkv → one packed attention with the rotary fused → proj,
with no host read and no per-image loop.
"""

from __future__ import annotations

import torch

from ..ops.attention_varlen import attention_varlen

__all__ = ["QWEN_VISION_ATTENTION_CLASSES", "is_qwen_vision_attention", "qwen_vision_attention_forward"]

# transformers classes whose ``forward`` is the same packed-vision code (qkv Linear → RoPE via
# apply_rotary_pos_emb_vision → attention over cu_seqlens → proj); checked against the 5.24 sources.
# Qwen2.5-Omni's differs (no fused qkv) and is not listed.
QWEN_VISION_ATTENTION_CLASSES = (
    "VisionAttention",  # Qwen2-VL
    "Qwen2_5_VLVisionAttention",
    "Qwen3VLVisionAttention",
    "Qwen3VLMoeVisionAttention",
    "Qwen3_5VisionAttention",
    "Qwen3_5MoeVisionAttention",
    "Qwen3OmniMoeVisionAttention",
    "Glm4vVisionAttention",
)


def is_qwen_vision_attention(m: torch.nn.Module) -> bool:
    """Whether ``m`` is one of transformers' packed vision attentions listed above (exact class,
    not a subclass that may override ``forward``)."""
    cls = type(m)
    return (
        cls.__name__ in QWEN_VISION_ATTENTION_CLASSES
        and cls.__module__.startswith("transformers.models.")
        and isinstance(getattr(m, "qkv", None), torch.nn.Linear)
        and isinstance(getattr(m, "proj", None), torch.nn.Module)
        and isinstance(getattr(m, "num_heads", None), int)
    )


def qwen_vision_attention_forward(
    self,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """The module's forward with qkv split as views (no copies), the RoPE applied inside the
    kernel and one :func:`mmkernels.attention_varlen` over ``cu_seqlens``.

    ``hidden_states`` (total, C); ``cu_seqlens`` (n+1,) prefix sums (images, frames or windows);
    ``position_embeddings`` (cos, sin) of shape (total, D).  ``max_seqlen``, when the caller
    gives one as an int, is passed on as a grid hint.  Returns (total, C) after ``proj``.

    Equivalent: transformers' ``Qwen2_5_VLVisionAttention.forward`` (any attn_implementation).
    """
    total = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(total, 3, self.num_heads, -1).unbind(1)
    if cu_seqlens.dtype != torch.int32:  # transformers builds int32, but grid_thw's dtype under tracing
        cu_seqlens = cu_seqlens.to(torch.int32)
    hint = max_seqlen if isinstance(max_seqlen, int) and not isinstance(max_seqlen, bool) else None
    out = attention_varlen(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=hint, max_seqlen_k=hint,
        dropout_p=self.attention_dropout if self.training else 0.0,
        scale=self.scaling, rotary=position_embeddings,
    )
    return self.proj(out.reshape(total, -1))
