"""Training-free visual-token pruning inside :func:`mmkernels.patch` (``prune=``).

Both methods read attention scores that eager implementations get only from
``output_attentions=True`` (a (B, H, L, L) tensor per layer).  Here the scoring layer's
attention runs once on :func:`mmkernels.attention` and the scores come from its row statistics
(:func:`mmkernels.attention_scores`): O(L) extra memory, no eager layer.

* :class:`FastV` — the language model of LLaVA / LLaVA-NeXT / LLaVA-NeXT-Video /
  LLaVA-OneVision / Qwen2-VL / Qwen2.5-VL: after decoder layer K-1, drop the image (and video)
  tokens that received the least attention from the last token, for every later layer and for
  the KV cache they build (FastV, Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2").
* :class:`VisionZip` — a CLIP or SigLIP vision tower: after one encoder layer, keep the
  "dominant" tokens that received the most attention from CLS (SigLIP, which has no CLS: from
  all query rows on average) and merge the rest into a few "contextual" tokens (VisionZip,
  Yang et al. 2024, "VisionZip: Longer is Better but Not Necessary").

Hooks, not copies of HF forwards: the scoring layer's attention module gets a
``_mmkernels_scores_request`` that :func:`mmkernels.integrations.hf.mmkernels_attention_forward`
answers, and forward (pre-)hooks on the decoder / encoder layers gather the hidden states, masks,
RoPE tables and position ids.  :func:`mmkernels.unpatch` removes all of it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..ops.select_tokens import gather_tokens, select_tokens

__all__ = ["FastV", "VisionZip", "kept_index"]

_REQUEST = "_mmkernels_scores_request"
_RESULT = "_mmkernels_scores"
_STATE = "_mmkernels_prune_state"

# multimodal models whose ``language_model`` FastV prunes (LLaMA / Qwen2 / Qwen2-VL text models)
_FASTV_PARENTS = ("LlavaModel", "LlavaNextModel", "LlavaNextVideoModel", "LlavaOnevisionModel",
                  "Qwen2VLModel", "Qwen2_5_VLModel")
# vision towers VisionZip prunes, by config class (transformers 5 folds CLIPVisionTransformer into
# CLIPVisionModel; older releases nest it as .vision_model): config class -> has a CLS token
_VISIONZIP_CONFIGS = {"CLIPVisionConfig": True, "SiglipVisionConfig": False}
# Qwen-VL vision towers (packed, no CLS, 2x2 merger after the blocks) VisionZip prunes, by config class
_VISIONZIP_QWEN_CONFIGS = ("Qwen2VLVisionConfig", "Qwen2_5_VLVisionConfig", "Qwen3VLVisionConfig")


@dataclass(frozen=True)
class FastV:
    """FastV pruning of the visual tokens in a VLM's language model.

    The rule (FastV, Chen et al., ECCV 2024, §4; the ``inplace`` variant of its reference code):
    take decoder layer ``layer - 1``'s attention, average it over heads, read the row of the
    **last token** of the prompt, and keep the ``keep`` image tokens with the largest values
    (``keep``: a fraction of each sample's image tokens, rounded as ``round(keep · n)``, FastV's
    ``1 - R``; or an int count); every text token is kept.  Decoder layers ``layer``, ``layer+1``,
    ... then run on the kept tokens only, in their original order and with their original
    positions (RoPE / M-RoPE ids are gathered, not renumbered), and their KV cache holds only the
    kept tokens, so ``generate()`` decodes against the pruned cache.  The paper's setting is
    ``FastV(layer=2, keep=0.5)`` (K=2, R=50%).

    Requirements, checked with ``ValueError``: ``layer`` >= 1 and below the number of decoder
    layers; the model's attention on mmkernels (``patch(..., attention=True)``); prompts left-padded
    when batched (the last position must be a real token in every row — HF's ``padding_side="left"``
    for generation); the same number of image tokens in every sample (so the pruned batch stays
    rectangular); ``input_ids`` given (image tokens are found by id).  The pruned ``forward`` returns logits
    for the kept positions only (:func:`kept_index` says which).  Dynamic (default) and static
    caches (``generate(..., cache_implementation="static")``: layers >= K fill slots 0..n-1 of
    their fixed-size cache, the rest stays masked) both work, and so does transformers' compiled
    decoding (``compile_config=...``): decode steps trace without data-dependent branches or
    per-step guards (``fullgraph=True``, no recompiles); the prefill runs eagerly, as transformers
    runs it.

    The sequence gets shorter, so every per-token tensor loses the same positions: the attention
    mask, RoPE tables and position ids of layers >= ``layer`` are gathered internally (the caller's
    tensors are not modified), and ``labels=`` / ``shift_labels=`` given to the model's ``forward``
    are gathered at the kept positions before HF computes the loss.  With ``labels`` the loss is
    next-token prediction over the pruned sequence: text-to-text terms are unchanged, the token
    after a run of dropped image tokens is predicted from the last kept token before it, and the
    labels of dropped positions (image tokens: normally ``-100``) leave the loss.
    """

    layer: int = 2
    keep: float | int = 0.5

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"FastV.layer: expected an int >= 1 (scores come from layer - 1), got {self.layer!r}")
        _check_keep("FastV.keep", self.keep)


@dataclass(frozen=True)
class VisionZip:
    """VisionZip token reduction in a CLIP / SigLIP vision tower.

    The rule (VisionZip, Yang et al., CVPR 2025, §3.2 and its reference code): after encoder
    layer ``layer`` (default -2, the layer LLaVA reads features from), with that layer's attention
    summed over heads —

    1. **dominant**: CLIP keeps CLS plus the ``dominant - 1`` tokens CLS attends to most; SigLIP
       (no CLS) keeps the ``dominant`` tokens with the largest attention averaged over all query
       rows.  Original order is kept.
    2. **contextual**: the remaining R tokens, in order, are split into ``contextual`` targets
       (every ``max(1, R // contextual)``-th, the first ``contextual`` of them) and the others; each
       other token goes to the target whose key (the layer's keys averaged over heads,
       L2-normalised) has the largest cosine similarity; a contextual token is its target plus the
       mean of the tokens assigned to it.

    The layer's output becomes ``[dominant tokens, contextual tokens]`` (``dominant + contextual``
    tokens) and the later layers run on it.  ``contextual=0`` is plain CLS-attention pruning.
    ``VisionZip(dominant=54, contextual=10)`` is the paper's 64-token LLaVA-1.5 setting.

    Supported on standalone towers (``CLIPVisionModel``, ``SiglipVisionModel``, or any model
    holding one whose caller accepts a shorter sequence) and inside ``LlavaForConditionalGeneration``
    (LLaVA-1.5).  There the language model sees ``dominant + contextual`` tokens per image (as in
    VisionZip's reference code: with LLaVA's ``"default"`` feature strategy, which drops CLS after
    the tower, the tower keeps CLS plus ``dominant`` tokens), and the processor's one placeholder
    per unpruned patch is reduced to match: of each image's run of placeholders in ``input_ids``
    the first ``dominant + contextual`` stay, and ``attention_mask``, ``labels`` /
    ``shift_labels``, ``position_ids`` and ``token_type_ids`` lose the same positions before HF
    sees them (the caller's tensors are not modified; :func:`kept_index` gives the kept positions).
    The model then computes exactly what an unpatched LLaVA computes on that shorter prompt with
    the reduced features: ``forward`` returns logits (and the loss) over the shorter sequence;
    ``generate()`` reduces the prompt before generating and returns the caller's prompt followed by
    the new tokens.  A prompt already written with ``dominant + contextual`` placeholders per image
    is used as is.  Requirements (``ValueError``): the same number of placeholders per image, the
    same number of images per sample in a batch, ``vision_feature_layer`` an int not before
    ``layer``, a 2D attention mask.  LLaVA-NeXT / -OneVision (anyres tiles, newline tokens) and
    the Qwen-VL *language* models are refused: their features are laid out on the patch grid.

    **Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers** (``Qwen2VisionTransformerPretrainedModel``,
    ``Qwen2_5_VisionTransformerPretrainedModel``, ``Qwen3VLVisionModel``, e.g. ``model.model.visual``
    patched on its own): the towers have no CLS and merge 2×2 patches after the blocks, so the
    rule runs per image of the packing (per frame of a video: each is its own attention sequence)
    at **merged-token** granularity, on the tower's ``pooler_output`` (the merger's output, original
    order) — Qwen3-VL's ``deepstack_features`` lose the same tokens.  Scores: the **last
    full-attention block** (Qwen2-VL / Qwen3-VL: the last block; Qwen2.5-VL: the last of
    ``fullatt_block_indexes``; ``layer`` is not used), every query row of the image, heads
    averaged — fused into that block's packed forward (``mk.attention_varlen(...,
    return_scores=dict(query_index=None))``: no second QKᵀ pass, no (L, L) matrix) — a merged
    token's score is the sum of its 2×2 patches'.  ``dominant``: an int count per image (capped at
    its merged tokens) or a float fraction of them (``max(1, round(f·n))``); ``contextual``
    tokens merge the rest by the cosine similarity of the layer's un-rotated keys (heads and the
    2×2 patches averaged), appended after each image's dominant tokens.  The tower then returns,
    per image, ``[dominant, contextual]`` merged tokens instead of all of them;
    :func:`kept_index` gives the dominant tokens' positions in the unpruned ``pooler_output``.
    The language model's placeholders / M-RoPE positions are not reduced (patch the tower, not
    the ``...ForConditionalGeneration``).
    """

    dominant: int | float = 54
    contextual: int = 10
    layer: int = -2

    def __post_init__(self):
        d = self.dominant
        if isinstance(d, float) and not isinstance(d, bool):
            if not 0.0 < d <= 1.0:
                raise ValueError(f"VisionZip.dominant: a fraction (Qwen-VL towers) must lie in (0, 1], got {d}")
        for name in ("dominant", "contextual", "layer") if not isinstance(d, float) else ("contextual", "layer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"VisionZip.{name}: expected an int, got {v!r}")
        if self.dominant <= 0 or self.contextual < 0:
            raise ValueError(f"VisionZip: expected dominant >= 1 and contextual >= 0, got {self.dominant}, "
                             f"{self.contextual}")


def _check_keep(name: str, keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"{name}: expected a fraction in (0, 1] or an int count >= 0, got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep <= 1.0:
        raise ValueError(f"{name}: a fraction must lie in (0, 1], got {keep}")
    if isinstance(keep, int) and keep < 0:
        raise ValueError(f"{name}: a count must be >= 0, got {keep}")


def kept_index(model: nn.Module) -> torch.Tensor | None:
    """The (B, n) positions of the caller's sequence that the last pruned forward of ``model`` kept:
    FastV's kept tokens of the last pruned prefill, or, with VisionZip inside LLaVA, the positions
    left after the image placeholders were reduced (None if none)."""
    for m in model.modules():
        st = m.__dict__.get(_STATE)
        if isinstance(st, (_FastVState, _VisionZipLlavaState, _VisionZipQwenHook)):
            return st.index
    return None


# --------------------------------------------------------------------------------------
# FastV
# --------------------------------------------------------------------------------------
class _FastVState:
    def __init__(self, spec: FastV, parent: nn.Module, lm: nn.Module, visual_ids: list[int]):
        self.spec, self.parent, self.lm, self.visual_ids = spec, parent, lm, visual_ids
        self.layers = lm.layers
        self.scorer = self.layers[spec.layer - 1].self_attn
        self.visual = None       # (B, L) bool, set by the parent's forward from input_ids
        self.index = None        # (B, n) kept positions of the last pruned prefill
        self.prefill_len = 0
        self.cache = None        # the cache that prefill filled: decode steps are recognised by it
        self.static = False      # whether that cache is a static (fixed-size, compileable) one
        self.mode = None         # None | "prefill" | "decode" for the running LM forward
        self.memo: dict = {}     # id(original kwarg tensor) -> gathered, per LM forward
        self.pruned = False      # whether the running parent forward pruned (set by layer_pre)
        self.targets: list = []  # [(private copy given to HF, original)] of labels / shift_labels
        self.labels_pos = False  # labels' positional index in the owner's forward (None: keyword only)

    # -- the model computing the loss (e.g. LlavaForConditionalGeneration) ----------------
    def owner_pre(self, module, args, kwargs):
        """``labels`` / ``shift_labels`` are handed to HF as private copies, which
        :meth:`parent_post` shrinks to the kept positions once the parent's forward has pruned
        (the loss is computed after it, from these same tensor objects)."""
        self.targets = []
        args, labels_pos = list(args), self.labels_pos
        for name in ("labels", "shift_labels"):
            if name in kwargs:
                t = kwargs[name]
            elif name == "labels" and labels_pos is not None and labels_pos < len(args):
                t = args[labels_pos]
            else:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                continue  # HF's own checks apply
            private = t.clone()
            self.targets.append((private, t))
            if name in kwargs:
                kwargs[name] = private
            else:
                args[labels_pos] = private
        return tuple(args), kwargs

    def owner_post(self, module, args, kwargs, output):
        self.targets = []
        return None

    # -- parent (multimodal model) -----------------------------------------------------
    def parent_pre(self, module, args, kwargs):
        self.pruned = False
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            self.visual = None
            if embeds is not None and embeds.shape[1] > 1:
                raise ValueError("FastV: pass input_ids (image tokens are found by id), not inputs_embeds")
            return None
        ids_t = torch.tensor(self.visual_ids, device=ids.device)
        self.visual = torch.isin(ids, ids_t)
        return None

    def parent_post(self, module, args, kwargs, output):
        self.visual = None
        if self.pruned:
            # the logits HF computes next cover the kept positions only: drop the same positions
            # from labels / shift_labels (in place on the private copies HF holds, see owner_pre)
            for private, original in self.targets:
                if original.shape[-1] == self.prefill_len:
                    private.set_(gather_tokens(original, self.index, -1))
        self.pruned = False
        return None

    # -- language model ------------------------------------------------------------------
    def lm_pre(self, module, args, kwargs):
        self.mode, self.memo = None, {}
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = embeds if embeds is not None else ids
        if x is None:
            return None
        length = x.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        visual = self.visual
        if length > 1 and past == 0 and visual is not None and visual.shape[1] == length and bool(visual.any()):
            mask2d = kwargs.get("attention_mask")
            if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 and not bool(mask2d[:, -1].all()):
                raise ValueError("FastV: the last position of every prompt must be a real token (scores come from "
                                 "the last token): pad batched prompts on the left (padding_side='left')")
            counts = visual.sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError(f"FastV: every sample needs the same number of image tokens to stay a rectangular "
                                 f"batch, got {counts.tolist()}")
            n_vis = int(counts[0])
            if isinstance(self.spec.keep, int) and self.spec.keep > n_vis:
                raise ValueError(f"FastV.keep: {self.spec.keep} image tokens requested, the prompt has {n_vis}")
            self.mode, self.index, self.prefill_len, self.cache = "prefill", None, length, cache
            self.static = bool(getattr(cache, "is_compileable", False))
            self.scorer.__dict__[_REQUEST] = dict(query_index=-1, reduce_heads="mean")
        elif (self.index is not None and cache is not None and cache is self.cache
              and (torch.compiler.is_compiling() or past > 0)):  # compiled decode: no data-dependent branch
            self.mode = "decode"
        else:
            self.index, self.cache = None, None
        return None

    def lm_post(self, module, args, kwargs, output):
        self.scorer.__dict__.pop(_REQUEST, None)
        self.scorer.__dict__.pop(_RESULT, None)
        if self.mode == "prefill":
            cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
            self.cache = cache if cache is not None else self.cache
        self.mode, self.memo = None, {}
        return None

    # -- decoder layers >= K ---------------------------------------------------------------
    def _once(self, t, fn):
        if torch.compiler.is_compiling():
            return fn(t)  # id() would guard on the tensor object: a recompile per decode step
        key = id(t)
        if key not in self.memo:
            self.memo[key] = (t, fn(t))  # keep t alive so its id is not reused within this forward
        return self.memo[key][1]

    def layer_pre(self, module, args, kwargs):
        if self.mode is None:
            return None
        args = list(args)
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.mode == "prefill":
            if module is self.layers[self.spec.layer]:
                result = self.scorer.__dict__.pop(_RESULT, None)
                self.scorer.__dict__.pop(_REQUEST, None)
                if result is None:
                    raise RuntimeError("FastV: the scoring layer produced no attention scores (is its attention "
                                       "still on attn_implementation='mmkernels'?)")
                scores = result[0][..., : hidden.shape[1]]  # a static cache: keys = max_cache_len slots
                keep = self.spec.keep
                n_vis = int(self.visual_or_raise().sum(1)[0])
                k = int(round(keep * n_vis)) if isinstance(keep, float) else keep
                hidden, self.index = select_tokens(hidden, scores.to(hidden.device), k, protect=~self.visual)
                self.pruned = True
            idx = self.index
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = self._once(mask, lambda m: self._columns(gather_tokens(m, idx, -2)))
            pe = kwargs.get("position_embeddings")
            if isinstance(pe, tuple):
                kwargs["position_embeddings"] = tuple(self._once(t, lambda t: gather_tokens(t, idx, -2)) for t in pe)
            pos = kwargs.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.shape[-1] == self.prefill_len:
                kwargs["position_ids"] = self._once(
                    pos, lambda p: gather_tokens(p, idx, -1, batch_dim=0 if p.dim() == 2 else 1))
        else:  # decode: the layer's cache holds the kept prefill tokens, then every generated one
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape[-1] > self.prefill_len:
                kwargs["attention_mask"] = self._once(mask, self._columns)
        if args:
            args[0] = hidden
        else:
            kwargs["hidden_states"] = hidden
        return tuple(args), kwargs

    def _columns(self, m: torch.Tensor) -> torch.Tensor:
        """The key columns of a mask built for the unpruned sequence (prefill length ``L``, then the
        generated tokens), rearranged for the caches of layers >= K: the kept prefill tokens, then
        every later one.  A static cache keeps its ``max_cache_len`` slots (it writes the kept tokens
        to slots 0..n-1 and the generated ones right after them), so the columns the pruned
        positions leave free at its end are masked."""
        w = m.shape[-1]
        b = max(m.shape[0], self.index.shape[0])
        new = torch.arange(self.prefill_len, w, device=m.device).expand(b, -1)
        out = gather_tokens(m, torch.cat([self.index.to(m.device).expand(b, -1), new], 1), -1)
        if self.static and out.shape[-1] < w:
            fill = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
            out = torch.nn.functional.pad(out, (0, w - out.shape[-1]), value=fill)
        return out

    def visual_or_raise(self):
        if self.visual is None:
            raise RuntimeError("FastV: lost track of the image-token mask during the forward")
        return self.visual


def _labels_position(module: nn.Module):
    """The positional index of ``labels`` in ``module.forward`` (None: keyword only), or False when
    its forward takes no ``labels``."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    for i, p in enumerate(params):
        if p.name == "labels":
            return i if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else None
    return False


def _visual_token_ids(config) -> list[int]:
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


def _apply_fastv(model: nn.Module, spec: FastV, report, undo: list[Callable]) -> None:
    found = False
    for path, m in model.named_modules():
        if type(m).__name__ not in _FASTV_PARENTS:
            continue
        lm = getattr(m, "language_model", None)
        layers = getattr(lm, "layers", None)
        if lm is None or not isinstance(layers, nn.ModuleList):
            report.skipped.append((path, type(m).__name__, "FastV: no language_model.layers"))
            continue
        if spec.layer >= len(layers):
            raise ValueError(f"FastV.layer: {spec.layer} must be below the number of decoder layers ({len(layers)}) "
                             f"of {path or '<root>'}")
        impl = getattr(lm.config, "_attn_implementation", None)
        if impl != "mmkernels":
            raise ValueError(f"prune=FastV(...): the language model's attention must run on mmkernels to give scores, "
                             f"got attn_implementation={impl!r} (keep patch(..., attention=True))")
        ids = _visual_token_ids(m.config)
        if not ids:
            raise ValueError(f"FastV: {type(m).__name__}'s config names no image_token_id")
        st = _FastVState(spec, m, lm, ids)
        handles = [m.register_forward_pre_hook(st.parent_pre, with_kwargs=True),
                   m.register_forward_hook(st.parent_post, with_kwargs=True, always_call=True),
                   lm.register_forward_pre_hook(st.lm_pre, with_kwargs=True),
                   lm.register_forward_hook(st.lm_post, with_kwargs=True, always_call=True)]
        handles += [layer.register_forward_pre_hook(st.layer_pre, with_kwargs=True) for layer in layers[spec.layer:]]
        # the module that computes the loss from labels (LlavaForConditionalGeneration for LlavaModel ...)
        owner = model.get_submodule(path.rpartition(".")[0]) if path else None
        st.labels_pos = _labels_position(owner) if owner is not None else False
        if st.labels_pos is not False:
            handles += [owner.register_forward_pre_hook(st.owner_pre, with_kwargs=True),
                        owner.register_forward_hook(st.owner_post, with_kwargs=True, always_call=True)]
        m.__dict__[_STATE] = st

        def _undo(handles=handles, m=m, st=st):
            for h in handles:
                h.remove()
            st.scorer.__dict__.pop(_REQUEST, None)
            st.scorer.__dict__.pop(_RESULT, None)
            m.__dict__.pop(_STATE, None)

        undo.append(_undo)
        report.methods.append((path, "language_model.forward",
                               f"FastV(layer={spec.layer}, keep={spec.keep}): image tokens pruned after decoder layer "
                               f"{spec.layer - 1} by the last token's attention (mk.attention_scores)"))
        found = True
    if not found:
        raise ValueError(f"prune=FastV(...): no LLaVA / LLaVA-NeXT / LLaVA-OneVision / Qwen2-VL model inside "
                         f"{type(model).__name__} (supported: {', '.join(_FASTV_PARENTS)})")


# --------------------------------------------------------------------------------------
# VisionZip
# --------------------------------------------------------------------------------------
def visionzip_reduce(hidden: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int,
                     contextual: int, has_cls: bool) -> torch.Tensor:
    """VisionZip's reduction of one layer's output (see :class:`VisionZip` for the rule).

    ``hidden`` (B, L, C) the layer's output; ``scores`` (B, L) the attention each token received
    (CLS row for CLIP, summed over heads; mean over rows for SigLIP); ``keys`` (B, Hkv, L, d) the
    layer's keys.  Returns (B, dominant + contextual, C).
    """
    b, length, c = hidden.shape
    if dominant + contextual > length or (has_cls and dominant < 1):
        raise ValueError(f"VisionZip: dominant + contextual = {dominant + contextual} exceeds the {length} tokens "
                         f"of the layer")
    protect = [0] if has_cls else None
    dom, index = select_tokens(hidden, scores.float(), dominant - (1 if has_cls else 0), protect=protect)
    if contextual == 0:
        return dom
    rest_mask = torch.ones(b, length, dtype=torch.bool, device=hidden.device)
    rest_mask[torch.arange(b, device=hidden.device)[:, None], index] = False
    r = length - dominant
    rest = hidden[rest_mask].view(b, r, c)
    metric = keys.mean(1)[rest_mask].view(b, r, -1).float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, r // contextual)
    targets = torch.arange(0, r, step, device=hidden.device)[:contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    sim = metric[:, ~is_target] @ metric[:, targets].transpose(1, 2)          # (B, R - contextual, contextual)
    assign = torch.nn.functional.one_hot(sim.argmax(-1), contextual).to(hidden.dtype)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)
    merged = assign.transpose(1, 2) @ rest[:, ~is_target] / counts
    return torch.cat([dom, rest[:, targets] + merged], dim=1)


class _VisionZipHook:
    """Forward hook of the scoring encoder layer: its output → VisionZip's reduced tokens.  An
    object rather than a closure, so ``copy.deepcopy`` of a patched model points the copy's hook
    at the copy's attention module."""

    def __init__(self, spec: VisionZip, attn: nn.Module, has_cls: bool, dominant: int | None = None):
        self.spec, self.attn, self.has_cls = spec, attn, has_cls
        self.dominant = spec.dominant if dominant is None else dominant

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        result = self.attn.__dict__.pop(_RESULT, None)
        if result is None:
            raise RuntimeError("VisionZip: the scoring layer produced no attention scores")
        scores, keys = result
        if not self.has_cls:
            scores = scores / hidden.shape[1]  # summed over rows → mean over query rows
        reduced = visionzip_reduce(hidden, scores, keys, self.dominant, self.spec.contextual, self.has_cls)
        return (reduced, *output[1:]) if isinstance(output, tuple) else reduced


class _VisionZipLlavaState:
    """VisionZip inside a ``LlavaModel``: the tower returns ``dominant + contextual`` features per
    image, so the prompt keeps that many image placeholders per image — the first ones of each
    image's run — and every per-token input (attention mask, labels, position ids, ...) loses the
    same positions, before HF sees them: the language model then runs exactly as on a prompt the
    processor had written with ``dominant + contextual`` placeholders per image."""

    # per-token inputs of the owner's forward gathered with input_ids (dim -1)
    _PER_TOKEN = ("input_ids", "attention_mask", "labels", "shift_labels", "position_ids", "token_type_ids",
                  "mm_token_type_ids")

    def __init__(self, spec: VisionZip, parent: nn.Module, owner: nn.Module, image_token_id: int):
        self.spec, self.parent, self.owner, self.image_token_id = spec, parent, owner, image_token_id
        self.per_image = spec.dominant + spec.contextual
        self.index = None  # (B, L') positions of the caller's sequence that the last pruned forward kept
        params = list(inspect.signature(owner.forward).parameters.values())
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def kept(self, input_ids: torch.Tensor, n_images: int) -> torch.Tensor | None:
        """(B, L') positions to keep, or None when the prompt already has ``dominant + contextual``
        placeholders per image (e.g. :meth:`generate` reduced it)."""
        visual = input_ids == self.image_token_id
        total, m = int(visual.sum()), self.per_image
        if n_images < 1 or total == n_images * m:
            return None
        n = total // n_images
        counts = visual.sum(1)
        if total % n_images or n < m or bool((counts % max(n, 1) != 0).any()):
            raise ValueError(f"VisionZip: {total} image placeholders for {n_images} images; expected the same number "
                             f"per image, each >= dominant + contextual = {m} (reduced to {m} per image)")
        rank = visual.long().cumsum(1) - 1
        keep = ~visual | (rank % n < m)
        lengths = keep.sum(1)
        if not bool((lengths == lengths[0]).all()):
            raise ValueError(f"VisionZip: every sample needs the same number of images to stay a rectangular batch "
                             f"after the placeholders are reduced, got {(counts // n).tolist()} images")
        return keep.nonzero()[:, 1].view(input_ids.shape[0], -1)

    def _reduce(self, kwargs: dict) -> dict:
        ids, pix = kwargs.get("input_ids"), kwargs.get("pixel_values")
        if not isinstance(ids, torch.Tensor) or not isinstance(pix, torch.Tensor) or ids.dim() != 2:
            return kwargs
        if kwargs.get("image_sizes") is not None and pix.dim() != 4:
            raise ValueError("VisionZip: pixel_values with image_sizes (variable-size images) are not supported")
        index = self.kept(ids, pix.shape[0])
        if index is None:
            return kwargs
        length = ids.shape[1]
        kwargs = dict(kwargs)
        for name in self._PER_TOKEN:
            t = kwargs.get(name)
            if not isinstance(t, torch.Tensor) or t.shape[-1] != length:
                continue
            if name == "attention_mask" and t.dim() != 2:
                raise ValueError("VisionZip: a 4D attention_mask cannot follow the reduced image placeholders; pass "
                                 "the 2D padding mask")
            batch_dim = 0 if t.dim() == 2 else 1  # (3, B, L) M-RoPE ids
            kwargs[name] = gather_tokens(t, index.to(t.device), -1, batch_dim=batch_dim)
        cp = kwargs.get("cache_position")
        if isinstance(cp, torch.Tensor) and cp.dim() == 1 and cp.shape[0] == length:
            kwargs["cache_position"] = cp[: index.shape[1]]
        self.index = index
        return kwargs

    def owner_pre(self, module, args, kwargs):
        kwargs = dict(kwargs)
        for name, a in zip(self.positional, args):
            kwargs[name] = a
        return (), self._reduce(kwargs)


class _VisionZipGenerate:
    """``generate`` of a patched LLaVA: the prompt is reduced once, before HF's generation loop
    (so its cache, cache positions and attention mask follow the reduced length), and the returned
    sequences are the caller's prompt followed by the new tokens.  An object, not a closure, so a
    deep copy generates with the copy."""

    def __init__(self, st: _VisionZipLlavaState):
        self.st = st

    def __call__(self, *args, **kwargs):
        st = self.st
        owner = st.owner
        if args:
            params = list(inspect.signature(type(owner).generate).parameters.values())[1:]
            names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            kwargs.update(zip(names, args))
            args = ()
        name = "inputs" if isinstance(kwargs.get("inputs"), torch.Tensor) else "input_ids"
        ids = kwargs.get(name)
        reduced = st._reduce(dict(kwargs, input_ids=ids)) if isinstance(ids, torch.Tensor) else kwargs
        if ids is None or reduced is kwargs:
            return type(owner).generate(owner, *args, **kwargs)
        reduced = dict(reduced)
        new_ids = reduced.pop("input_ids")
        reduced[name] = new_ids
        out = type(owner).generate(owner, *args, **reduced)
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        full = torch.cat([ids.to(seq.device), seq[:, new_ids.shape[1]:]], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out


def visionzip_plan(scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int):
    """VisionZip's selection for one image of n tokens (no CLS): ``scores`` (n,), ``keys`` (n, d).
    Returns (dominant index (k,) ascending, contextual targets (c,), the others (r - c,), their
    one-hot assignment (r - c, c) to the targets) — the rule of :func:`visionzip_reduce`."""
    n = scores.shape[0]
    dom = torch.topk(scores.float(), dominant).indices.sort().values
    rest_mask = torch.ones(n, dtype=torch.bool, device=scores.device)
    rest_mask[dom] = False
    rest = rest_mask.nonzero()[:, 0]
    if contextual == 0 or rest.numel() == 0:
        return dom, rest[:0], rest[:0], None
    r = rest.numel()
    contextual = min(contextual, r)
    metric = keys[rest].float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, r // contextual)
    t_local = torch.arange(0, r, step, device=scores.device)[:contextual]
    is_target = torch.zeros(r, dtype=torch.bool, device=scores.device)
    is_target[t_local] = True
    sim = metric[~is_target] @ metric[t_local].T
    assign = torch.nn.functional.one_hot(sim.argmax(-1), contextual)
    return dom, rest[t_local], rest[~is_target], assign


def visionzip_apply(features: torch.Tensor, plan) -> torch.Tensor:
    """One image's (n, C) features → (dominant + contextual, C) by a :func:`visionzip_plan`: the
    dominant rows, then each target plus the mean of the rows assigned to it."""
    dom, targets, others, assign = plan
    if assign is None:
        return features[dom]
    a = assign.to(features.dtype)
    merged = a.T @ features[others] / a.sum(0).clamp(min=1)[:, None]
    return torch.cat([features[dom], features[targets] + merged])


class _VisionZipQwenHook:
    """Forward hook (with kwargs) of a Qwen-VL vision tower: the scoring block's fused scores and
    keys → each image's VisionZip tokens in the tower's ``pooler_output`` (and Qwen3-VL's
    ``deepstack_features``).  An object, so ``copy.deepcopy`` retargets it."""

    def __init__(self, spec: VisionZip, tower: nn.Module, attn: nn.Module):
        self.spec, self.tower, self.attn = spec, tower, attn
        self.index = None  # dominant tokens' positions in the unpruned pooler_output (last forward)

    def _count(self, n: int) -> int:
        d = self.spec.dominant
        k = max(1, round(d * n)) if isinstance(d, float) else d
        return min(k, n)

    def __call__(self, module, args, kwargs, output):
        result = self.attn.__dict__.pop(_RESULT, None)
        if result is None:
            raise RuntimeError("VisionZip: the scoring block produced no attention scores")
        scores, keys = result  # (total,) heads averaged, (total, H, d) un-rotated
        grid = args[1] if len(args) > 1 else kwargs["grid_thw"]
        tower = self.tower
        unit = tower.spatial_merge_size ** 2
        group_scores = scores.float().view(-1, unit).sum(1)
        group_keys = keys.float().mean(1).view(-1, unit, keys.shape[-1]).mean(1)
        if hasattr(tower, "fullatt_block_indexes"):  # Qwen2.5-VL: the blocks ran in window order
            import sys

            helper = getattr(sys.modules[type(tower).__module__], "get_vision_window_index", None)
            if helper is None:
                from transformers.vision_utils import get_vision_window_index as helper
            window_index, _ = helper(grid, spatial_merge_size=tower.spatial_merge_size,
                                     window_size=tower.window_size, patch_size=tower.patch_size)
            reverse = torch.argsort(window_index.to(group_scores.device))
            group_scores, group_keys = group_scores[reverse], group_keys[reverse]
        tuple_out = isinstance(output, tuple)
        pooled = output[1] if tuple_out else output.pooler_output
        deep = (output[2] if tuple_out and len(output) > 2 else getattr(output, "deepstack_features", None)) or []
        feats = [pooled, *deep]
        outs, index, start = [[] for _ in feats], [], 0
        for t, h, w in grid.tolist():
            for _ in range(int(t)):
                n = int(h) * int(w) // unit
                plan = visionzip_plan(group_scores[start:start + n], group_keys[start:start + n], self._count(n),
                                      min(self.spec.contextual, n - self._count(n)))
                for lst, f in zip(outs, feats):
                    lst.append(visionzip_apply(f[start:start + n], plan))
                index.append(plan[0] + start)
                start += n
        self.index = torch.cat(index) if index else pooled.new_zeros(0, dtype=torch.long)
        reduced = [torch.cat(o) if o else f[:0] for o, f in zip(outs, feats)]
        if tuple_out:
            rest = (reduced[1:],) if len(output) > 2 else ()
            return (output[0], reduced[0], *rest, *output[3:])
        output.pooler_output = reduced[0]
        if deep:
            output.deepstack_features = reduced[1:]
        return output


def _apply_visionzip_qwen(model: nn.Module, spec: VisionZip, report, undo: list[Callable]) -> bool:
    from .qwen_vl import is_qwen_vision_attention, qwen_vision_attention_forward

    found = False
    for path, m in model.named_modules():
        if type(m).__name__ in ("Qwen2VLModel", "Qwen2_5_VLModel", "Qwen3VLModel", "Qwen3VLMoeModel"):
            raise ValueError(f"prune=VisionZip(...): {type(m).__name__} at {path or '<root>'} places one image "
                             "placeholder and M-RoPE position per merged token, which VisionZip does not reduce; "
                             "patch its vision tower alone (mk.patch(model.model.visual, prune=...))")
    for path, m in model.named_modules():
        if type(getattr(m, "config", None)).__name__ not in _VISIONZIP_QWEN_CONFIGS or not isinstance(
                getattr(m, "blocks", None), nn.ModuleList) or not hasattr(m, "merger"):
            continue
        full = getattr(m, "fullatt_block_indexes", None)
        block = max(full) if full else len(m.blocks) - 1
        attn = m.blocks[block].attn
        fwd = attn.__dict__.get("forward")
        if not is_qwen_vision_attention(attn) or getattr(fwd, "__func__", None) is not qwen_vision_attention_forward:
            raise ValueError("prune=VisionZip(...) on a Qwen-VL vision tower: its attention must run on mmkernels "
                             "to give fused scores (keep patch(..., attention=True))")
        attn.__dict__[_REQUEST] = dict(query_index=None, reduce_heads="mean")
        hook = _VisionZipQwenHook(spec, m, attn)
        handle = m.register_forward_hook(hook, with_kwargs=True)
        m.__dict__[_STATE] = hook

        def _undo(handle=handle, attn=attn, m=m):
            handle.remove()
            attn.__dict__.pop(_REQUEST, None)
            attn.__dict__.pop(_RESULT, None)
            m.__dict__.pop(_STATE, None)

        undo.append(_undo)
        report.methods.append((path, "forward", f"VisionZip(dominant={spec.dominant}, contextual={spec.contextual}): "
                               f"mean-attention merged tokens per image kept, scores of blocks[{block}] fused in its "
                               "mk.attention_varlen forward"))
        found = True
    return found


def _feature_hidden_index(parent: nn.Module, n_layers: int) -> int:
    fl = getattr(parent.config, "vision_feature_layer", -2)
    if not isinstance(fl, int):
        raise ValueError(f"prune=VisionZip(...): {type(parent).__name__} reads several vision layers "
                         f"(vision_feature_layer={fl!r}); VisionZip needs one")
    if not -(n_layers + 1) <= fl <= n_layers:
        raise ValueError(f"VisionZip: vision_feature_layer={fl} is out of range")
    return fl % (n_layers + 1)  # index into hidden_states: 0 = embeddings, i = output of layer i - 1


def _apply_visionzip(model: nn.Module, spec: VisionZip, report, undo: list[Callable]) -> None:
    llava: dict[int, tuple] = {}  # id(vision tower) -> (parent, owner, strategy)
    if _apply_visionzip_qwen(model, spec, report, undo):
        return
    if isinstance(spec.dominant, float):
        raise ValueError(f"VisionZip.dominant: a fraction ({spec.dominant}) is for Qwen-VL vision towers; CLIP / "
                         "SigLIP towers take an int count")
    for path, m in model.named_modules():
        name = type(m).__name__
        if name == "LlavaModel":
            owner = model.get_submodule(path.rpartition(".")[0]) if path else None
            if owner is None or not hasattr(owner, "generate"):
                raise ValueError("prune=VisionZip(...) inside LLaVA: patch the LlavaForConditionalGeneration that "
                                 "holds the LlavaModel (its forward / generate reduce the image placeholders)")
            tok = getattr(m.config, "image_token_id", getattr(m.config, "image_token_index", None))
            llava[id(m.vision_tower)] = (m, owner, getattr(m.config, "vision_feature_select_strategy", "default"),
                                         tok)
        elif name in _FASTV_PARENTS:
            raise ValueError(f"prune=VisionZip(...): {name} at {path or '<root>'} lays its image features out on the "
                             "patch grid (anyres tiles, newline tokens, pooling), which VisionZip's reduction does "
                             "not keep; supported: LlavaModel (LLaVA-1.5) and standalone CLIP / SigLIP towers")
    found, seen = False, set()
    for path, m in model.named_modules():
        has_cls = _VISIONZIP_CONFIGS.get(type(getattr(m, "config", None)).__name__)
        encoder = getattr(m, "encoder", None)
        layers = getattr(encoder, "layers", None)
        if has_cls is None or not hasattr(m, "embeddings") or id(encoder) in seen:
            continue
        if not isinstance(layers, nn.ModuleList):
            report.skipped.append((path, type(m).__name__, "VisionZip: no encoder.layers"))
            continue
        seen.add(id(encoder))
        n = len(layers)
        if not -n <= spec.layer < n:
            raise ValueError(f"VisionZip.layer: {spec.layer} is out of range for {n} encoder layers")
        impl = getattr(m.config, "_attn_implementation", None)
        if impl != "mmkernels":
            raise ValueError(f"prune=VisionZip(...): the vision attention must run on mmkernels to give scores, got "
                             f"attn_implementation={impl!r} (keep patch(..., attention=True))")
        dominant, extra = spec.dominant, []
        inside = next((v for k, v in llava.items() if k in {id(x) for x in m.modules()} or k == id(m)), None)
        if inside is not None:
            parent, owner, strategy, tok = inside
            h = _feature_hidden_index(parent, n)
            if h <= spec.layer % n:
                raise ValueError(f"VisionZip.layer: {spec.layer} runs after the layer LLaVA reads its features from "
                                 f"(vision_feature_layer={parent.config.vision_feature_layer}); prune at or before it")
            if not isinstance(tok, int):
                raise ValueError("VisionZip: the LLaVA config names no image_token_id")
            # LLaVA's "default" strategy drops the first token (CLS) after the tower: keep one more so the
            # language model sees dominant + contextual tokens per image (VisionZip's reference code)
            if strategy == "default":
                dominant += 1
            st = _VisionZipLlavaState(spec, parent, owner, tok)
            handle = owner.register_forward_pre_hook(st.owner_pre, with_kwargs=True)
            owner.__dict__["generate"] = _VisionZipGenerate(st)
            parent.__dict__[_STATE] = st

            def _undo_llava(handle=handle, owner=owner, parent=parent):
                handle.remove()
                owner.__dict__.pop("generate", None)
                parent.__dict__.pop(_STATE, None)

            extra.append(_undo_llava)
        layer = layers[spec.layer]
        attn = layer.self_attn
        # CLIP: the CLS row summed over heads; SigLIP: every row, summed over heads (÷ L below)
        attn.__dict__[_REQUEST] = dict(query_index=0 if has_cls else None, reduce_heads="sum")

        h = layer.register_forward_hook(_VisionZipHook(spec, attn, has_cls, dominant))

        def _undo(h=h, attn=attn, extra=extra):
            h.remove()
            attn.__dict__.pop(_REQUEST, None)
            attn.__dict__.pop(_RESULT, None)
            for f in extra:
                f()

        undo.append(_undo)
        report.methods.append((path, f"encoder.layers[{spec.layer}].forward",
                               f"VisionZip(dominant={spec.dominant}, contextual={spec.contextual}): "
                               f"{'CLS' if has_cls else 'mean'}-attention tokens kept (mk.attention_scores)"
                               + ("; LLaVA image placeholders reduced to match" if inside is not None else "")))
        found = True
    if not found:
        raise ValueError(f"prune=VisionZip(...): no CLIP / SigLIP vision transformer inside {type(model).__name__}")


def apply(model: nn.Module, prune, report, undo: list[Callable]) -> None:
    """The ``prune=`` step of :func:`mmkernels.patch`: register the hooks, record how to undo them."""
    if isinstance(prune, FastV):
        _apply_fastv(model, prune, report, undo)
    elif isinstance(prune, VisionZip):
        _apply_visionzip(model, prune, report, undo)
    else:
        raise ValueError(f"prune: expected mmkernels.FastV(...) or mmkernels.VisionZip(...), got {prune!r}")
