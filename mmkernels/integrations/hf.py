"""Hugging Face transformers integration: ``attn_implementation="mmkernels"``.

:func:`register_hf` registers two functions under the name ``"mmkernels"``:

* with ``transformers.AttentionInterface``: :func:`mmkernels_attention_forward`, which takes
  HF's attention-interface call (``module, query, key, value, attention_mask, dropout, scaling,
  is_causal, **kwargs``; q/k/v (B, H, L, D)) and runs :func:`mmkernels.attention`, returning
  ``(output (B, Lq, H, D), None)`` exactly as HF's ``sdpa`` implementation does;
* with ``transformers.masking_utils.AttentionMaskInterface``: :func:`mmkernels_mask`, which
  builds the same boolean mask (True = attend, (B, 1, Lq, Lk), or ``None`` when ``is_causal``
  alone describes it) as HF builds for ``sdpa`` — the form :func:`mmkernels.attention` reads
  directly.  Without this registration HF's mask helpers return ``attention_mask=None`` for an
  unknown implementation name and padding is silently lost.

The name avoids "flash", "sdpa" and "flex": transformers keys special code paths on those
substrings.  Importing this module does not import transformers; :func:`register_hf` does.
"""

from __future__ import annotations

import torch

from ..ops.attention import attention

__all__ = ["ATTN_IMPLEMENTATION", "mmkernels_attention_forward", "mmkernels_mask", "register_hf"]

ATTN_IMPLEMENTATION = "mmkernels"


def mmkernels_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function on :func:`mmkernels.attention`.

    ``query`` (B, Hq, Lq, D), ``key``/``value`` (B, Hkv, Lk, D) with Hkv = Hq /
    ``module.num_key_value_groups`` (grouped heads are read in-kernel, never repeated);
    ``attention_mask`` bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk);
    ``is_causal`` falls back to ``module.is_causal`` (default True) and applies, as in HF's sdpa
    function, only when there is no mask and Lq > 1.  A query of batch 1 against a key/value
    batch > 1 (learned queries) is broadcast.  Returns ``(out (B, Lq, Hq, D), None)``: the
    attention weights are never formed.  Extra keyword arguments (``sliding_window``,
    ``position_ids``, ...) are ignored, as in HF's sdpa function; ``softcap`` and
    ``position_bias`` are handled (``softcap`` is rejected with ``ValueError``, like sdpa).

    Equivalent PyTorch: ``transformers.integrations.sdpa_attention.sdpa_attention_forward``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='mmkernels' does not support `softcap`; use 'eager'")
    groups = getattr(module, "num_key_value_groups", 1) or 1
    enable_gqa = key.shape[1] != query.shape[1]
    if enable_gqa and groups > 1 and query.shape[1] != key.shape[1] * groups:
        raise ValueError(
            f"query has {query.shape[1]} heads, key has {key.shape[1]} and module.num_key_value_groups={groups}")
    # learned queries of batch 1 against a batch of keys (or the reverse): SDPA broadcasts
    if query.shape[0] != key.shape[0]:
        b = max(query.shape[0], key.shape[0])
        query = query.expand(b, *query.shape[1:])
        key, value = key.expand(b, *key.shape[1:]), value.expand(b, *value.shape[1:])
    lq, lk = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(lq > 1 and attention_mask is None and is_causal)
    if is_causal and lk > lq:
        # prefill into an empty static cache: HF's sdpa function crops the same way
        key, value = key[:, :, :lq], value[:, :, :lq]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)
        if attention_mask.shape[-1] != key.shape[2]:
            # HF slices static-cache masks to the key length; keep the visible part
            attention_mask = attention_mask[..., : key.shape[2]]
    request = getattr(module, "_mmkernels_scores_request", None)
    if request is not None:
        # token pruning (mmkernels.integrations.prune) asked this layer for attention scores:
        # one forward, the scores reuse its row statistics; the keys are kept for VisionZip's merge
        out, scores = attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa, return_scores=request)
        module._mmkernels_scores = (scores, key.detach())
    else:
        out = attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout), is_causal=is_causal,
                        scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def mmkernels_mask(*args, **kwargs):
    """HF mask-interface function: the boolean (B, 1, Lq, Lk) mask HF builds for sdpa (True =
    attend), or ``None`` when causality alone (``is_causal``) or nothing needs masking — what
    :func:`mmkernels_attention_forward` consumes.  Same arguments as
    ``transformers.masking_utils.sdpa_mask``."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


_registered = False


def register_hf() -> str:
    """Register ``attn_implementation="mmkernels"`` with transformers (attention **and** mask
    interfaces; idempotent).  Returns the name.

    Then ``AutoModel.from_pretrained(..., attn_implementation="mmkernels")`` or
    ``model.set_attn_implementation("mmkernels")`` routes every attention-interface call of the
    model through :func:`mmkernels.attention`.  Raises ``ImportError`` without transformers.
    """
    global _registered
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, mmkernels_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, mmkernels_mask)
    _registered = True
    return ATTN_IMPLEMENTATION
