"""Hugging Face transformers integration: ``attn_implementation="mmkernels"``.

:func:`register_hf` registers two functions under the name ``"mmkernels"``:

* with ``transformers.AttentionInterface``: :func:`mmkernels_attention_forward`, which takes
  HF's attention-interface call (``module, query, key, value, attention_mask, dropout, scaling,
  is_causal, **kwargs``; q/k/v (B, H, L, D)) and runs :func:`mmkernels.attention`, returning
  ``(output (B, Lq, H, D), None)`` exactly as HF's ``sdpa`` implementation does — except that a
  call asked for attention weights (``output_attentions=True``) runs the model's eager attention
  and returns them (one warning per process), where ``sdpa`` drops them;
* with ``transformers.masking_utils.AttentionMaskInterface``: :func:`mmkernels_mask`, which
  builds the same boolean mask (True = attend, (B, 1, Lq, Lk), or ``None`` when ``is_causal``
  alone describes it) as HF builds for ``sdpa`` — the form :func:`mmkernels.attention` reads
  directly.  Without this registration HF's mask helpers return ``attention_mask=None`` for an
  unknown implementation name and padding is silently lost.

The name avoids "flash", "sdpa" and "flex": transformers keys special code paths on those
substrings.

Padding-free packed LM batches (``DataCollatorWithFlattening``): transformers 5.x detects the
packing from ``position_ids`` for every implementation (``find_packed_sequence_indices`` in
``create_causal_mask``) and asks the registered mask function for the block-causal mask, so a
packed batch is already correct here.  When the collator also emits flash-attn's boundary kwargs
(``return_flash_attn_kwargs=True``: ``cu_seq_lens_q/k``, ``max_length_q/k``), HF forwards them to
the attention function, which then runs one :func:`mmkernels.attention_varlen` per layer instead
of reading the dense mask.  Not taken: registering under a "flash" name so HF skips the dense
mask — transformers 5.24 then loads that name as a flash-attn package or a kernels-hub repo
(``lazy_import_flash_attention`` → ``load_and_register_attn_kernel``), which needs the
``kernels`` package and a hub download; and a mask function cannot tell a packing mask from
other composed masks (Gemma 3's bidirectional image blocks) because it only receives an opaque
``mask_function``.  So HF still builds (and we ignore) the (1, 1, L, L) mask and its
``find_packed_sequence_indices`` check reads one bool on the host per forward.

M-RoPE models (Qwen2-VL / Qwen2.5-VL / Qwen3-VL) pack by ``position_ids`` of shape (3, 1, L) or
(4, 1, L): :func:`mmkernels.integrations.qwen_vl.enable_mrope_packing` derives the boundaries from
them on the device and hands them to this function as ``cu_seq_lens_q/k`` (no dense mask, no host
read), which then takes the same ``attention_varlen`` route.

Importing this module does not import transformers; :func:`register_hf` does.
"""

from __future__ import annotations

import torch

from ..ops.attention import attention
from ..ops.attention_varlen import attention_varlen

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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention-interface function on :func:`mmkernels.attention`.

    ``query`` (B, Hq, Lq, D), ``key``/``value`` (B, Hkv, Lk, D) with Hkv = Hq /
    ``module.num_key_value_groups`` (grouped heads are read in-kernel, never repeated);
    ``attention_mask`` bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk);
    ``is_causal`` falls back to ``module.is_causal`` (default True) and applies, as in HF's sdpa
    function, only when there is no mask and Lq > 1.  A query of batch 1 against a key/value
    batch > 1 (learned queries) is broadcast.  A padding-free packed batch (batch 1 with
    ``cu_seq_lens_q``/``cu_seq_lens_k`` kwargs, from ``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)``) runs as one :func:`mmkernels.attention_varlen` call
    (see :func:`_packed_forward`).  Returns ``(out (B, Lq, Hq, D), None)``: the
    attention weights are never formed (unless requested, below).  Extra keyword arguments (``sliding_window``,
    ``position_ids``, ...) are ignored, as in HF's sdpa function; ``softcap`` and
    ``position_bias`` are handled (``softcap`` is rejected with ``ValueError``, like sdpa).

    ``output_attentions=True`` (in ``kwargs``, or transformers' output recorder collecting
    attentions for this forward): the fused kernel never forms the weights, so that call runs
    through eager attention instead — the model's own ``eager_attention_forward`` with HF's
    eager (additive) mask — and returns ``(out, weights (B, Hq, Lq, Lk))`` as ``"eager"`` would,
    with one :class:`UserWarning` per process (O(L²) memory, no fused kernel).  transformers'
    ``sdpa`` instead warns once and returns ``None`` (so no attentions come back).

    Equivalent PyTorch: ``transformers.integrations.sdpa_attention.sdpa_attention_forward``.
    """
    if _attentions_requested(kwargs):
        if getattr(module, "_mmkernels_scores_request", None) is not None:
            # token pruning scores this layer: its scores come from the fused call, as without weights
            _fused_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
        return _eager_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    return _fused_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def _fused_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """:func:`mmkernels_attention_forward` without attention weights: the kernels."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='mmkernels' does not support `softcap`; use 'eager'")
    groups = getattr(module, "num_key_value_groups", 1) or 1
    enable_gqa = key.shape[1] != query.shape[1]
    if enable_gqa and groups > 1 and query.shape[1] != key.shape[1] * groups:
        raise ValueError(
            f"query has {query.shape[1]} heads, key has {key.shape[1]} and module.num_key_value_groups={groups}")
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and query.shape[0] == key.shape[0] == 1 \
            and kwargs.get("position_bias") is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return _packed_forward(query, key, value, cu_q, cu_k, kwargs, dropout, scaling, causal, enable_gqa)
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


_output_attentions_warned = False


def _compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover - torch without torch.compiler
        return False


def _attentions_requested(kwargs) -> bool:
    """Whether this attention call must return its weights: ``output_attentions=True`` in the
    kwargs HF forwards to the attention function, or (outside a compile trace) transformers'
    output recorder collecting ``*attentions`` for the running forward (models whose layers do
    not pass the flag down still record the attention module's second output)."""
    if kwargs.get("output_attentions"):
        return True
    if _compiling():
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers: the flag is in kwargs or nowhere
        return False
    collected = _active_collector.get()
    return bool(collected) and any(k.endswith("attentions") for k in collected)


def _warn_output_attentions(fn) -> None:
    global _output_attentions_warned
    if _output_attentions_warned or _compiling():
        return
    _output_attentions_warned = True
    import warnings

    where = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    warnings.warn(
        f"attn_implementation='mmkernels' with output_attentions=True: the fused kernel never forms the "
        f"attention weights, so every call asked for them runs eager attention ({where}), which materialises "
        "the (B, H, Lq, Lk) probabilities (O(L^2) memory, no fused kernel). Request attentions only when "
        "needed. (Warned once per process.)",
        UserWarning, stacklevel=4,
    )


def _generic_eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0,
                                     softcap=None, **kwargs):
    """transformers' canonical ``eager_attention_forward`` (for a model module that has none)."""
    groups = query.shape[1] // key.shape[1] if key.shape[1] else 1
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


_EAGER_FUNCTIONS: dict[type, object] = {}


def _model_eager_function(module):
    """The ``eager_attention_forward`` of ``module``'s modeling file (what ``"eager"`` runs) when
    it takes ``scaling`` and ``dropout`` by name, else :func:`_generic_eager_attention_forward`."""
    cls = type(module)
    fn = _EAGER_FUNCTIONS.get(cls)
    if fn is None:
        import inspect
        import sys

        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        try:
            params = inspect.signature(fn).parameters if callable(fn) else {}
        except (TypeError, ValueError):
            params = {}
        if not {"scaling", "dropout"} <= set(params):
            fn = _generic_eager_attention_forward
        _EAGER_FUNCTIONS[cls] = fn
    return fn


def _eager_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """The call as ``attn_implementation="eager"`` runs it, for ``output_attentions=True``: the
    model's eager function on HF's eager mask (additive float; the boolean / ``None``-when-causal
    mask built for this implementation converted the way ``masking_utils.eager_mask`` does)."""
    fn = _model_eager_function(module)
    _warn_output_attentions(fn)
    lq, lk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is None and causal and lq > 1:
        # the mask interface skipped a pure causal mask (is_causal carries it): eager needs it explicit
        # (top-left aligned, as SDPA's is_causal and the fused path read it)
        mask = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()[None, None]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, torch.zeros((), device=mask.device, dtype=query.dtype), torch.finfo(query.dtype).min)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if is_causal is not None:
        kwargs = dict(kwargs, is_causal=is_causal)
    return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _packed_forward(query, key, value, cu_q, cu_k, kwargs, dropout, scaling, is_causal, enable_gqa):
    """A padding-free packed batch (B = 1 holding several sequences, with flash-attn's boundary
    kwargs ``cu_seq_lens_q/k``, ``max_length_q/k`` as ``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)`` emits them): one :func:`mmkernels.attention_varlen` call.
    The boundaries define the masking, as on HF's flash path; the (1, 1, L, L) block-causal mask
    HF also derives from ``position_ids`` for non-flash implementations is not read."""
    def hint(name):
        m = kwargs.get(name)
        return m if isinstance(m, int) and not isinstance(m, bool) else None

    cu_q = cu_q if cu_q.dtype == torch.int32 else cu_q.to(torch.int32)
    cu_k = cu_k if cu_k.dtype == torch.int32 else cu_k.to(torch.int32)
    out = attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
                           max_seqlen_q=hint("max_length_q"), max_seqlen_k=hint("max_length_k"),
                           dropout_p=float(dropout), is_causal=bool(is_causal), scale=scaling, enable_gqa=enable_gqa)
    return out.unsqueeze(0), None


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
