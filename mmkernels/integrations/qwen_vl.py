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

# set by mmkernels.integrations.prune on the scoring layer's attention: a return_scores request,
# answered with (scores, keys) in SCORES_RESULT (same names as prune's _REQUEST / _RESULT)
SCORES_REQUEST = "_mmkernels_scores_request"
SCORES_RESULT = "_mmkernels_scores"

__all__ = ["QWEN_TEXT_MODEL_CLASSES", "QWEN_VISION_ATTENTION_CLASSES", "enable_mrope_packing",
           "is_qwen_vision_attention", "mrope_packed_cu_seqlens", "qwen_vision_attention_forward"]

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
    # transformers sets scaling = head_dim ** -0.5, the op's default: passing None keeps a float
    # attribute out of the call, which torch.compile(dynamic=True) turns into a SymFloat that the
    # op's argument check cannot test on the host (math.isfinite: a graph break)
    scaling = self.scaling
    scale = None if isinstance(scaling, float) and scaling == q.shape[-1] ** -0.5 else scaling
    request = self.__dict__.get(SCORES_REQUEST)
    out = attention_varlen(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen_q=hint, max_seqlen_k=hint,
        dropout_p=self.attention_dropout if self.training else 0.0,
        scale=scale, rotary=position_embeddings, return_scores=request,
    )
    if request is not None:
        # VisionZip (mmkernels.integrations.prune): the key importance from this same forward
        # (fused in the packed kernel) and the layer's un-rotated keys, for the tower's hook
        out, scores = out
        self.__dict__[SCORES_RESULT] = (scores, k.detach())
    return self.proj(out.reshape(total, -1))


# --------------------------------------------------------------------------------------
# padding-free packing of the language model (M-RoPE position ids)
# --------------------------------------------------------------------------------------
# transformers text models whose forward takes M-RoPE ``position_ids`` (3, B, L), or (4, B, L) with
# the text positions in row 0, and passes its extra kwargs down to the attention function.
QWEN_TEXT_MODEL_CLASSES = (
    "Qwen2VLTextModel",
    "Qwen2_5_VLTextModel",
    "Qwen3VLTextModel",
    "Qwen3VLMoeTextModel",
)


def mrope_packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence boundaries of a packed row from its M-RoPE position ids, on the device.

    ``position_ids``: (3, 1, L) (temporal, height, width: what ``get_rope_index`` returns, one
    sample after the other) or (4, 1, L) (text positions first, as Qwen2.5-VL / Qwen3-VL also
    take them).  A sample starts where its positions restart: for 4 rows where the text row does
    not step by 1 (transformers' ``find_packed_sequence_indices`` rule), for 3 rows where all three
    are 0 (every sample's first token is at position (0, 0, 0); vision tokens follow text, so they
    never are).  Returns int32 (L + 1,) prefix sums: the real sequences, then empty ones — the
    number of samples is a device value, so the length is its upper bound L and nothing is read on
    the host (compiles with no graph break; the varlen kernels skip empty sequences).
    """
    if position_ids.dim() != 3 or position_ids.shape[0] not in (3, 4) or position_ids.shape[1] != 1:
        raise ValueError(f"position_ids: expected (3, 1, L) or (4, 1, L), got {tuple(position_ids.shape)}")
    pos = position_ids[:, 0]
    length = pos.shape[-1]
    if pos.shape[0] == 4:
        text = pos[0]
        start = torch.diff(text, prepend=text[:1] - 1) != 1
    else:
        start = (pos == 0).all(0)
    start[:1] = True
    seq = torch.cumsum(start.to(torch.int32), 0, dtype=torch.int32) - 1
    lengths = torch.zeros(length, dtype=torch.int32, device=pos.device).index_add_(
        0, seq, torch.ones_like(seq))
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=torch.int32)])


def _packing_pre_hook(module, args, kwargs):
    pos = kwargs.get("position_ids")
    if (
        not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[0] not in (3, 4) or pos.shape[1] != 1
        or args or kwargs.get("attention_mask") is not None or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("cache", kwargs.get("past_key_values")) is not None or kwargs.get("use_cache")
    ):
        return None
    cu = mrope_packed_cu_seqlens(pos)
    kwargs = dict(kwargs, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)
    # without its text row HF sees no packing and builds no dense (L, L) block mask: the
    # boundaries travel as flash-attn's kwargs to the attention function instead
    kwargs["position_ids"] = pos[1:] if pos.shape[0] == 4 else pos
    return args, kwargs


def enable_mrope_packing(model: torch.nn.Module) -> list:
    """Padding-free packed batches for Qwen2-VL / Qwen2.5-VL / Qwen3-VL language models running
    ``attn_implementation="mmkernels"``: a forward pre-hook on each text model that turns a packed
    row's M-RoPE ``position_ids`` ((3, 1, L) or (4, 1, L), samples one after the other, each from
    position 0) into the sequence boundaries (:func:`mrope_packed_cu_seqlens`, on the device) and
    passes them as ``cu_seq_lens_q/k``, so each layer's attention is one
    :func:`mmkernels.attention_varlen` call and no dense (L, L) mask is built.  Applies only to a
    call with batch 1, no ``attention_mask``, no cache and ``use_cache`` not set (training);
    every other call is left alone.  Idempotent; returns the hook handles.

    Without it, (4, 1, L) ids are packed by transformers itself (a dense block-causal mask, read by
    :func:`mmkernels.attention`), and (3, 1, L) ids are not packed at all (transformers cannot tell
    the samples apart: plain causal attention across them)."""
    handles = []
    for m in model.modules():
        cls = type(m)
        if cls.__name__ in QWEN_TEXT_MODEL_CLASSES and cls.__module__.startswith("transformers.models."):
            if getattr(m, "_mmkernels_packing_hook", None) is None:
                m._mmkernels_packing_hook = m.register_forward_pre_hook(_packing_pre_hook, with_kwargs=True)
            handles.append(m._mmkernels_packing_hook)
    return handles
