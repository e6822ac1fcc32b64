"""``mmkernels.patch(model)``: make a Hugging Face VLM (or any model holding
``torch.nn.MultiheadAttention``) use mmkernels in place, and ``mmkernels.unpatch(model)``.

What is patched (each switch of :func:`patch` turns one group off):

``attention``
  * every ``transformers.PreTrainedModel`` inside ``model`` that routes attention through HF's
    ``AttentionInterface`` gets ``attn_implementation="mmkernels"`` (see
    :mod:`mmkernels.integrations.hf`) on its config and sub-configs: CLIP / SigLIP / EVA-style
    BLIP-2 vision towers, the LMs (LLaMA,
    Qwen2, Gemma 3, OPT, ...), and the Q-Former when ``qformer=False``.  No module changes class.
    A config the user set to ``"eager"`` (on a model that supports sdpa, so not HF's fallback)
    is left alone unless ``override_eager=True``.  ``output_attentions=True`` still returns the
    weights: those calls run the model's eager attention (one warning per process; see
    :func:`mmkernels.integrations.hf.mmkernels_attention_forward`).
  * Qwen2-VL / Qwen2.5-VL (window and full blocks) / Qwen3-VL (and GLM-4V, Qwen3.5, Qwen3-Omni)
    vision attention: ``forward`` overridden on the instance to run qkv → one
    :func:`mmkernels.attention_varlen` over the packed images/windows with the vision RoPE fused →
    proj (:mod:`mmkernels.integrations.qwen_vl`): no per-image loop, no dense mask, no host read.
  * Qwen2.5-VL / Qwen3-VL vision towers (``static_tower=True``, opt-in): ``forward`` overridden on
    the instance to build the rotary position ids, window index, ``cu_seqlens`` /
    ``cu_window_seqlens`` and Qwen3-VL's interpolated position embeddings from ``grid_thw`` on the
    device, with shapes from shapes only, then run the model's own forward on them
    (:mod:`mmkernels.integrations.qwen_vl_tower`): the same outputs, no ``grid_thw.tolist()``, so
    ``torch.compile(dynamic=True)`` serves every image size from one graph.
  * ``torch.nn.MultiheadAttention`` → :class:`mmkernels.nn.MultiheadAttention` (shared
    parameters).  Inside SigLIP's attention-pooling head, whose caller discards the weights, the
    replacement never forms them (:class:`WeightlessMultiheadAttention`), so the fused path runs.
  * timm's ``Attention`` (``VisionTransformer`` blocks): its ``forward`` is overridden on the
    instance to run :func:`mmkernels.attention` (``AttentionRope`` is left alone for now).
``qformer``
  BLIP-2 / InstructBLIP(-Video) Q-Former attention modules (self and cross) →
  :class:`mmkernels.nn.QFormerAttention` (fused cross-attention: K/V never written to memory),
  and the Q-Former encoder's ``forward`` overridden on the instance to open a
  :class:`mmkernels.nn.QFormerSharedKV` scope: K and V of all its cross-attention layers (they read
  the same image features) come from one GEMM per forward where
  :func:`mmkernels.ops.qformer_cross_attention.shares_kv` says so (``qformer_shared_kv``: None = that rule,
  True = always, False = never).
``pooling``
  Gemma 3 projector, LLaVA-NeXT-Video pooler, Qwen2-VL / Qwen2.5-VL patch mergers →
  the :mod:`mmkernels.nn.token_pool` drop-ins; the methods ``LlavaOnevisionModel.apply_pooling``,
  ``InternVLModel.pixel_shuffle`` (merge) and ``InternVLModel.get_image_features`` (pixel shuffle
  + the projector's LayerNorm(4C) in one :func:`mmkernels.token_pool` call with the projector's
  own weights, then its Linear → act → Linear in torch), and ``Idefics3Connector.pixel_shuffle`` /
  ``SmolVLMConnector.pixel_shuffle`` are overridden on the instance.

Parameters, buffers and ``state_dict`` keys do not change (the drop-ins share the original
``Parameter`` objects).  A drop-in of another class gets transformers' output-recording hooks of
the module it replaces (``output_attentions`` / ``cross_attentions`` of the Q-Former), which
transformers would otherwise not install on it.  :func:`unpatch` puts every original module
object, method and config value back.
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..nn import token_pool as tp
from ..nn.attention import MultiheadAttention
from ..nn.qformer import QFormerAttention, QFormerSharedKV
from .qwen_vl import is_qwen_vision_attention, qwen_vision_attention_forward
from .qwen_vl_tower import is_qwen_vision_tower, static_vision_forward
from .timm import attention_forward as timm_attention_forward
from .timm import is_timm_attention

__all__ = ["PatchReport", "WeightlessMultiheadAttention", "is_patched", "patch", "unpatch"]

_STATE_ATTR = "_mmkernels_patch_state"

_QFORMER_CLASSES = ("Blip2QFormerMultiHeadAttention", "InstructBlipQFormerMultiHeadAttention",
                    "InstructBlipVideoQFormerMultiHeadAttention")
_QFORMER_ENCODER_CLASSES = ("Blip2QFormerEncoder", "InstructBlipQFormerEncoder", "InstructBlipVideoQFormerEncoder")
#: the attribute of a patched Q-Former encoder holding its :class:`mmkernels.nn.QFormerSharedKV`
SHARED_KV_ATTR = "mmkernels_shared_kv"
_POOL_CLASSES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "Gemma3MultiModalProjector": tp.Gemma3MultiModalProjector.from_hf,
    "LlavaNextVideoPooler": tp.LlavaNextVideoPooler.from_hf,
    "PatchMerger": tp.Qwen2VLPatchMerger.from_hf,             # Qwen2-VL
    "Qwen2_5_VLPatchMerger": tp.Qwen2VLPatchMerger.from_hf,
}
# parents whose caller discards nn.MultiheadAttention's weights (``self.attention(...)[0]``)
_WEIGHTS_DISCARDED_BY = ("SiglipMultiheadAttentionPoolingHead", "Siglip2MultiheadAttentionPoolingHead")


class WeightlessMultiheadAttention(MultiheadAttention):
    """:class:`mmkernels.nn.MultiheadAttention` that always takes the fused path
    (``need_weights`` is ignored and the weights returned are ``None``).  :func:`patch` uses it
    only where the caller discards the weights (SigLIP's attention-pooling head)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return super().forward(query, key, value, key_padding_mask, False, attn_mask, average_attn_weights,
                               is_causal)


@dataclass
class PatchReport:
    """What :func:`patch` did.  ``replaced``: (module path, old class, new class);
    ``configs``: (path of the model owning the config, config class, old implementation, new);
    ``methods``: (module path, method, replacement); ``skipped``: (path, class, why)."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    configs: list[tuple[str, str, str, str]] = field(default_factory=list)
    methods: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def num_patched(self) -> int:
        return len(self.replaced) + len(self.configs) + len(self.methods)

    def __str__(self) -> str:
        lines = [f"mmkernels.patch: {len(self.replaced)} module(s) replaced, {len(self.configs)} attention "
                 f"config(s) switched, {len(self.methods)} method(s) overridden, {len(self.skipped)} left alone"]
        if self.configs:
            lines.append("  attention implementation (HF AttentionInterface):")
            for path, cls, old, new in self.configs:
                lines.append(f"    {path or '<root>'} [{cls}]: {old!r} -> {new!r}")
        if self.replaced:
            lines.append("  modules:")
            for path, old, new in self.replaced:
                lines.append(f"    {path}: {old} -> {new}")
        if self.methods:
            lines.append("  methods:")
            for path, meth, new in self.methods:
                lines.append(f"    {path or '<root>'}.{meth} -> {new}")
        if self.skipped:
            lines.append("  left alone:")
            for path, cls, why in self.skipped:
                lines.append(f"    {path or '<root>'} [{cls}]: {why}")
        return "\n".join(lines)

    __repr__ = __str__


@dataclass
class _State:
    modules: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)   # (parent, name, original)
    configs: list[tuple[Any, Any]] = field(default_factory=list)                     # (config, old internal value)
    methods: list[tuple[nn.Module, str]] = field(default_factory=list)               # (owner, name)
    undo: list[Callable[[], None]] = field(default_factory=list)                     # prune hooks' removers
    report: PatchReport | None = None


def _pretrained_model_class():
    import sys

    if "transformers" not in sys.modules:  # a model holding HF modules has imported it already
        return None
    try:
        from transformers import PreTrainedModel
    except Exception:  # transformers broken: nothing HF to patch
        return None
    return PreTrainedModel


def _all_configs(config) -> list:
    """``config`` and its sub-configs at any depth (configs are unhashable: dedupe by id)."""
    out, seen, todo = [], set(), [config]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        for key in getattr(c, "sub_configs", {}) or {}:
            todo.append(getattr(c, key, None))
    return out


def _explicit_eager(implementation, owner) -> bool:
    """Whether a config's ``implementation`` is ``"eager"`` by the user's choice: HF only falls
    back to eager by itself for a model class without sdpa support (``owner``: the model the
    config belongs to; None, a sub-config without its own model, is kept as the user has it)."""
    if implementation != "eager":
        return False
    return owner is None or bool(getattr(owner, "_supports_sdpa", True))


def _patch_hf_attention(model: nn.Module, state: _State, report: PatchReport,
                        override_eager: bool = False) -> None:
    PreTrainedModel = _pretrained_model_class()
    if PreTrainedModel is None:
        return
    from .hf import ATTN_IMPLEMENTATION, register_hf

    # the outermost PreTrainedModels: set_attn_implementation recurses into the rest
    roots, covered = [], set()
    for path, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(r == "" or path.startswith(r + ".") for r in covered):
            roots.append((path, m))
            covered.add(path)
    if not roots:
        return
    register_hf()
    seen: set[int] = set()
    for root_path, root in roots:
        configs: list[tuple[Any, Any]] = []  # this root's configs, with their value before
        owner_models: dict[int, nn.Module] = {}  # config id -> the PreTrainedModel it configures
        for path, m in root.named_modules():
            if isinstance(m, PreTrainedModel):
                owner_models.setdefault(id(m.config), m)
                for c in _all_configs(m.config):
                    if id(c) not in seen:
                        seen.add(id(c))
                        configs.append((c, c._attn_implementation_internal))
                if not m._can_set_attn_implementation():
                    full = ".".join(p for p in (root_path, path) if p)
                    report.skipped.append((full, type(m).__name__,
                                           "does not use HF's AttentionInterface (attention left as is)"))
        try:
            root.set_attn_implementation(ATTN_IMPLEMENTATION)
        except (ValueError, KeyError, ImportError, NotImplementedError) as e:
            for c, old in configs:
                c._attn_implementation_internal = old
            report.skipped.append((root_path, type(root).__name__, f"set_attn_implementation refused: {e}"))
            continue
        owners: dict[int, str] = {}
        for path, m in root.named_modules():
            if isinstance(m, PreTrainedModel):
                owners.setdefault(id(m.config), ".".join(p for p in (root_path, path) if p))
        for c, old in configs:
            state.configs.append((c, old))
            if not override_eager and _explicit_eager(old, owner_models.get(id(c))):
                c._attn_implementation_internal = old  # set_attn_implementation recursed into it
                report.skipped.append((owners.get(id(c), f"{root_path or '<root>'} (sub-config)"), type(c).__name__,
                                       "attn_implementation='eager' set by the user: left alone "
                                       "(patch(..., override_eager=True) switches it)"))
                continue
            new = c._attn_implementation_internal
            if new != old:
                report.configs.append((owners.get(id(c), f"{root_path or '<root>'} (sub-config)"),
                                       type(c).__name__, old, new))


def _class_name(cls: type) -> str:
    """The shortest public dotted name of ``cls`` (``torch.nn.MultiheadAttention``,
    ``mmkernels.nn.QFormerAttention``), else its full module path."""
    import sys

    top = cls.__module__.split(".")[0]
    for public in ("torch.nn", "mmkernels.nn", "mmkernels.integrations", top):
        mod = sys.modules.get(public)
        if public.split(".")[0] == top and mod is not None and getattr(mod, cls.__name__, None) is cls:
            return f"{public}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _replace(model: nn.Module, path: str, new: nn.Module, state: _State, report: PatchReport) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent._modules[name]
    parent._modules[name] = new
    state.modules.append((parent, name, old))
    report.replaced.append((path, _class_name(type(old)), _class_name(type(new))))
    _mirror_output_recorders(model, path, old, new, state)


def _mirror_output_recorders(model: nn.Module, path: str, old: nn.Module, new: nn.Module, state: _State) -> None:
    """transformers (5.x) collects ``output_attentions`` / ``cross_attentions`` / hidden states
    with forward hooks it installs, once and lazily, on the modules of the classes a model lists
    in ``_can_record_outputs``; a drop-in of another class (``QFormerAttention`` for
    ``Blip2QFormerMultiHeadAttention``) would never get them and its outputs would silently go
    missing.  Give ``new`` the recording hooks that transformers installs (or would install) on
    ``old``, with the owning model's rules; the hooks are removed by :func:`unpatch`."""
    PreTrainedModel = _pretrained_model_class()
    if PreTrainedModel is None:
        return
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, OutputRecorder, _active_collector
    except ImportError:  # a transformers without hook-based output capture
        return
    parts = path.split(".")
    owner, rel = None, path
    for i in range(len(parts) - 1, -1, -1):  # the nearest PreTrainedModel above the module
        candidate = model.get_submodule(".".join(parts[:i])) if i else model
        if isinstance(candidate, PreTrainedModel):
            owner, rel = candidate, ".".join(parts[i:])
            break
    if owner is None:
        return
    module_name = "." + rel + "."  # transformers matches layer_name on ".a.b.c" (+ ".")
    hooks = []
    for key, specs in _CAN_RECORD_REGISTRY.get(owner).items():
        for spec in specs if isinstance(specs, list) else [specs]:
            if isinstance(spec, str):  # matched on the module path: transformers hooks the drop-in itself
                continue
            if not isinstance(spec, OutputRecorder):
                spec = OutputRecorder(target_class=spec, index=0 if "hidden_states" in key else 1)
            cls = spec.target_class
            if (cls is None or not isinstance(old, cls) or isinstance(new, cls)
                    or (spec.class_name is not None and module_name[:-1].endswith(spec.class_name))):
                continue
            if spec.layer_name is not None and "." + spec.layer_name.strip(".") + "." not in module_name:
                continue
            hooks.append(_recording_hook(_active_collector, key, spec.index, spec.capture_initial_hidden_state))
    if not hooks:
        return
    handles = [new.register_forward_hook(h) for h in hooks]
    installed = bool(getattr(owner, "_output_capturing_hooks_installed", False))

    def undo():
        for handle in handles:
            handle.remove()
        if not installed and getattr(owner, "_output_capturing_hooks_installed", False):
            # transformers installed its hooks (once, for good) while the drop-in was in place:
            # the original module coming back must record as it would have
            for h in hooks:
                old.register_forward_hook(h)

    state.undo.append(undo)


def _recording_hook(collector, key: str, index: int, capture_initial_hidden_state: bool):
    """transformers' output-capturing forward hook (``output_capturing.install_output_capuring_hook``)."""

    def hook(module, args, output):
        collected = collector.get()
        if collected is None or key not in collected:
            return
        if key == "hidden_states":
            states, selection = collected[key], collected.get("_hidden_states_layers")

            def append(h):
                states.append(h if selection is None or len(states) in selection else None)

            if capture_initial_hidden_state and not states:
                append(args[0])
            h = output[index] if isinstance(output, tuple) else output
            if h is not None:
                append(h)
        elif not isinstance(output, tuple):
            collected[key].append(output)
        elif output[index] is not None:
            collected[key].append(output[index])

    return hook


def _override(owner: nn.Module, name: str, fn: Callable, path: str, state: _State, report: PatchReport,
              what: str) -> None:
    # an instance attribute wins over the class's method; a bound method survives copy.deepcopy
    owner.__dict__[name] = types.MethodType(fn, owner)
    state.methods.append((owner, name))
    report.methods.append((path, name, what))


def _pool_layout_mismatch(cls: str, m: nn.Module) -> str:
    """Why ``m`` (matched by class name) does not have the layout its drop-in expects ("" = fine)."""
    if cls == "Gemma3MultiModalProjector":
        needed = ("mm_soft_emb_norm", "mm_input_projection_weight", "patches_per_image", "tokens_per_side")
    elif cls in ("PatchMerger", "Qwen2_5_VLPatchMerger"):
        needed = ("ln_q", "mlp", "hidden_size")
        if "qwen2" not in type(m).__module__:
            return f"a {cls} outside Qwen2-VL / Qwen2.5-VL"
        if not isinstance(getattr(m, "mlp", None), nn.Sequential):
            return "mlp is not an nn.Sequential"
    else:  # LlavaNextVideoPooler
        needed = ("pool",)
    missing = [a for a in needed if not hasattr(m, a)]
    return f"no {', '.join(missing)}" if missing else ""


def _onevision_apply_pooling(self, image_features):
    vc = self.config.vision_config
    side = vc.image_size // vc.patch_size
    return tp.LlavaOnevisionPooling(side, side)(image_features)


def _idefics3_pixel_shuffle(self, x, scale_factor=2):
    b, n, c = x.shape
    side = math.isqrt(n)
    if side * side != n or side % scale_factor:
        raise ValueError(f"pixel_shuffle: expected a square token grid divisible by {scale_factor}, got {n} tokens")
    return tp.Idefics3PixelShuffle(scale_factor)(x)


def _internvl_pixel_shuffle(self, vision_features, scale_factor=0.5):
    b, w, h, c = vision_features.shape
    if w != h:  # the fused merge reads a square grid; HF's tiles always are
        return type(self).pixel_shuffle(self, vision_features, scale_factor)
    out = tp.InternVLPixelShuffle(scale_factor)(vision_features.reshape(b, w * h, c))
    return out.view(b, round(w * scale_factor), round(h * scale_factor), out.shape[-1])


def _internvl_image_features_body(self, pixel_values, vision_feature_layer=None,
                                  vision_feature_select_strategy=None, **kwargs):
    """transformers' ``InternVLModel.get_image_features`` body with ``pixel_shuffle`` + the
    projector's ``layer_norm`` fused into one token_pool call (the CLS drop of the "default"
    strategy is read past, not copied); the projector's Linear → act → Linear run as HF's."""
    pixel_values = pixel_values.to(dtype=self.dtype)
    vision_outputs = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
    if vision_feature_layer == -1:
        vision_features = vision_outputs.last_hidden_state
    else:
        vision_features = vision_outputs.hidden_states[vision_feature_layer]
    proj = self.multi_modal_projector
    merged = tp.InternVLPixelShuffle(self.config.downsample_ratio, proj.layer_norm,
                                     has_cls=vision_feature_select_strategy == "default")(vision_features)
    vision_outputs.pooler_output = proj.linear_2(proj.act(proj.linear_1(merged)))
    return vision_outputs


_INTERNVL_GET_IMAGE_FEATURES = None


def _internvl_get_image_features_fn():
    """The fused body wrapped in the decorators transformers puts on ``get_image_features``
    (config defaults, ``return_dict``, hidden-state selection); ``None`` when this transformers
    lacks them (then only ``pixel_shuffle`` is overridden)."""
    global _INTERNVL_GET_IMAGE_FEATURES
    if _INTERNVL_GET_IMAGE_FEATURES is None:
        try:
            from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
            from transformers.utils.output_capturing import select_hidden_states
        except ImportError:
            return None
        fn = merge_with_config_defaults(can_return_tuple(select_hidden_states("vision_feature_layer")(
            _internvl_image_features_body)))
        fn.__name__ = fn.__qualname__ = "get_image_features"
        _INTERNVL_GET_IMAGE_FEATURES = fn
    return _INTERNVL_GET_IMAGE_FEATURES


def _internvl_fusion_mismatch(m: nn.Module) -> str:
    """Why ``InternVLModel`` ``m`` cannot take the fused pixel-shuffle + LayerNorm ("" = it can)."""
    proj = getattr(m, "multi_modal_projector", None)
    if proj is None or not all(hasattr(proj, a) for a in ("layer_norm", "linear_1", "act", "linear_2")):
        return "multi_modal_projector without layer_norm / linear_1 / act / linear_2"
    if type(proj).__name__ != "InternVLMultiModalProjector":
        return f"projector {type(proj).__name__} is not transformers' InternVLMultiModalProjector"
    if not isinstance(proj.layer_norm, nn.LayerNorm) or not proj.layer_norm.elementwise_affine:
        return "the projector's layer_norm is not an affine nn.LayerNorm"
    if proj.linear_1.in_features != proj.layer_norm.normalized_shape[0]:
        return "the projector's layer_norm width differs from linear_1's input"
    if proj._forward_hooks or proj._forward_pre_hooks:
        return "the projector has forward hooks (they would be bypassed)"
    hf_cls = next((c for c in type(m).__mro__ if c.__name__ == "InternVLModel"), None)
    if hf_cls is None or type(m).get_image_features is not hf_cls.get_image_features:
        return "get_image_features is overridden by a subclass"
    ratio = getattr(m.config, "downsample_ratio", None)
    if not ratio or abs(round(1 / ratio) * ratio - 1) > 1e-6:
        return f"downsample_ratio {ratio!r} is not 1/k"
    if _internvl_get_image_features_fn() is None:
        return "this transformers lacks the get_image_features decorators"
    return ""


def _qformer_encoder_forward(self, *args, **kwargs):
    """HF's Q-Former encoder forward inside a :class:`mmkernels.nn.QFormerSharedKV` scope: the
    shared K/V live exactly as long as this call."""
    shared = self.__dict__.get(SHARED_KV_ATTR)
    if shared is None:
        return type(self).forward(self, *args, **kwargs)
    enc = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else (
        args[2] if len(args) > 2 else None)
    if self.training and torch.is_grad_enabled() and any(
            getattr(layer, "gradient_checkpointing", False) for layer in self.layer):
        # a checkpointed layer replays its forward in the backward, after this scope has closed:
        # it must project its own K/V both times (and keeping all layers' K/V alive until then
        # would undo what checkpointing saves)
        enc = None
    with shared.scope(enc):
        return type(self).forward(self, *args, **kwargs)


def _share_qformer_kv(path: str, m: nn.Module, mode: bool | None, state: _State, report: PatchReport) -> None:
    """Install :class:`mmkernels.nn.QFormerSharedKV` on Q-Former encoder ``m`` (after its
    attention modules were replaced)."""
    cls = type(m).__name__
    if mode is False:
        report.skipped.append((path, cls, "qformer_shared_kv=False: each cross-attention layer projects its own K/V"))
        return
    layers, indices = [], []
    for i, layer in enumerate(getattr(m, "layer", ())):
        if not getattr(layer, "has_cross_attention", False):
            continue
        attn = getattr(getattr(layer, "crossattention", None), "attention", None)
        if not isinstance(attn, QFormerAttention) or attn._hf_forward is not None or not attn.is_cross_attention:
            report.skipped.append((path, cls, f"layer {i}'s cross-attention is not a fused QFormerAttention: "
                                   "K/V not shared"))
            return
        layers.append(attn)
        indices.append(i)
    if not layers:
        return
    params = list(inspect.signature(type(m).forward).parameters)[1:4]
    if params != ["hidden_states", "attention_mask", "encoder_hidden_states"]:
        report.skipped.append((path, cls, f"forward({', '.join(params)}, ...) is not HF's Q-Former encoder "
                               "signature: K/V not shared"))
        return
    if len({a.key.in_features for a in layers}) != 1:
        report.skipped.append((path, cls, "cross-attention layers of different input widths: K/V not shared"))
        return
    shared = QFormerSharedKV(layers, mode)
    shared.attach()
    state.undo.append(shared.detach)
    m.__dict__[SHARED_KV_ATTR] = shared
    state.methods.append((m, SHARED_KV_ATTR))  # _restore pops it with the forward override
    a, dkv = layers[0].all_head_size, layers[0].key.in_features
    rule = {None: "auto: mmkernels.ops.qformer_cross_attention.shares_kv", True: "always"}[mode]
    _override(m, "forward", _qformer_encoder_forward, path, state, report,
              f"mmkernels.nn.QFormerSharedKV: K/V of cross-attention layers {indices} in one "
              f"[{len(layers)}*2*{a}, {dkv}] GEMM per forward ({rule})")


def patch(model: nn.Module, *, attention: bool = True, qformer: bool = True, pooling: bool = True,
          prune=None, qformer_shared_kv: bool | None = None, override_eager: bool = False,
          static_tower: bool = False) -> PatchReport:
    """Switch ``model`` (in place) to mmkernels: HF attention-interface models to
    ``attn_implementation="mmkernels"``, ``nn.MultiheadAttention`` → :class:`mmkernels.nn.
    MultiheadAttention`, Q-Former attention → :class:`mmkernels.nn.QFormerAttention`, token
    poolers → :mod:`mmkernels.nn.token_pool` drop-ins (see the module docstring for the list).

    ``prune``: ``mmkernels.FastV(layer=2, keep=0.5)`` (LLaVA-family / Qwen2-VL language models) or
    ``mmkernels.VisionZip(dominant=54, contextual=10)`` (CLIP / SigLIP towers): visual-token
    pruning scored by :func:`mmkernels.attention_scores` (see :mod:`mmkernels.integrations.prune`).

    ``qformer_shared_kv`` (with ``qformer=True``): K/V of all the Q-Former's cross-attention layers
    from one GEMM per forward (:class:`mmkernels.nn.QFormerSharedKV`) — None: where
    :func:`mmkernels.ops.qformer_cross_attention.shares_kv` says so (Triton: unless the fused kernel would run;
    SDPA: on a GPU); True: always; False: never.  Change it later through the encoder's ``mmkernels_shared_kv.mode``.

    ``override_eager``: also switch the attention configs the user set to ``"eager"`` (left
    alone by default, listed under "left alone").  ``output_attentions=True`` on a patched model
    returns the attention weights as eager does: those calls run eager attention, with one
    warning per process naming the cost.

    ``static_tower`` (with ``attention=True``): Qwen2.5-VL / Qwen3-VL vision towers build their
    index tensors from ``grid_thw`` on the device
    (:func:`mmkernels.integrations.qwen_vl_tower.static_vision_forward`; identical outputs, no host
    read, no recompile per image size under ``torch.compile(dynamic=True)``).  The prefix sums are
    padded with empty sequences to a bound from the packed length (the frame and window counts are
    values: total/4 + 1 entries), so each attention launch gets about total/4 more programs per
    head that exit at once — on a GPU a cost comparable to a window layer's own work — which is
    why it is opt-in: turn it on to compile the tower once for every image size (training,
    ``torch.compile(dynamic=True)``); the default (False) keeps the model's own forward.

    Returns a :class:`PatchReport` (print it).  Parameters, buffers and ``state_dict`` keys are
    unchanged.  Patching a patched model raises; :func:`unpatch` first.

    Example::

        model = Blip2ForConditionalGeneration.from_pretrained(...)
        print(mmkernels.patch(model))
        ...
        mmkernels.unpatch(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected an nn.Module, got {type(model).__name__}")
    if qformer_shared_kv not in (None, True, False):
        raise ValueError(f"qformer_shared_kv: expected None (auto), True or False, got {qformer_shared_kv!r}")
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("patch: this model is already patched; call mmkernels.unpatch(model) first")
    state, report = _State(), PatchReport()
    try:
        if attention:
            _patch_hf_attention(model, state, report, override_eager)
        for path, m in list(model.named_modules()):
            cls = type(m).__name__
            if not path:
                if cls in _QFORMER_CLASSES or cls in _POOL_CLASSES or isinstance(m, nn.MultiheadAttention):
                    report.skipped.append(("", cls, "the root module cannot be replaced in place: use the "
                                           "mmkernels.nn drop-in's from_hf / from_torch"))
                    continue
            if cls in _QFORMER_CLASSES:
                if not qformer:
                    report.skipped.append((path, cls, "qformer=False" + (
                        " (runs through the attention interface)" if attention else "")))
                    continue
                _replace(model, path, QFormerAttention.from_hf(m), state, report)
            elif cls in _POOL_CLASSES:
                if not pooling:
                    report.skipped.append((path, cls, "pooling=False"))
                    continue
                why = _pool_layout_mismatch(cls, m)
                if why:
                    report.skipped.append((path, cls, f"unexpected layout ({why})"))
                    continue
                _replace(model, path, _POOL_CLASSES[cls](m), state, report)
            elif is_qwen_vision_attention(m):
                if not attention:
                    report.skipped.append((path, cls, "attention=False"))
                    continue
                _override(m, "forward", qwen_vision_attention_forward, path, state, report,
                          "mmkernels.integrations.qwen_vl.qwen_vision_attention_forward (one mk.attention_varlen "
                          "call per layer, vision RoPE fused)")
            elif is_qwen_vision_tower(m):
                if not (attention and static_tower):
                    report.skipped.append((path, cls, "attention=False" if not attention else "static_tower=False"))
                    continue
                _override(m, "forward", static_vision_forward, path, state, report,
                          "mmkernels.integrations.qwen_vl_tower.static_vision_forward (grid_thw index tensors "
                          "built on the device: no host read, no recompile per image size)")
            elif is_timm_attention(m):
                if not attention:
                    report.skipped.append((path, cls, "attention=False"))
                    continue
                _override(m, "forward", timm_attention_forward, path, state, report,
                          "mmkernels.integrations.timm.attention_forward (timm Attention on mk.attention)")
            elif cls == "AttentionRope" and type(m).__module__.startswith("timm."):
                report.skipped.append((path, cls, "timm attention with RoPE: not patched yet"))
            elif isinstance(m, nn.MultiheadAttention) and not isinstance(m, MultiheadAttention):
                if not attention:
                    report.skipped.append((path, cls, "attention=False"))
                    continue
                parent_path = path.rpartition(".")[0]
                parent = model.get_submodule(parent_path) if parent_path else model
                new_cls = (WeightlessMultiheadAttention if type(parent).__name__ in _WEIGHTS_DISCARDED_BY
                           else MultiheadAttention)
                _replace(model, path, new_cls.from_torch(m), state, report)
        if pooling:
            for path, m in model.named_modules():
                cls = type(m).__name__
                if cls in ("LlavaOnevisionModel",) and hasattr(m, "apply_pooling"):
                    _override(m, "apply_pooling", _onevision_apply_pooling, path, state, report,
                              "mmkernels.nn.LlavaOnevisionPooling (bilinear, fused)")
                elif cls in ("Idefics3Connector", "SmolVLMConnector") and hasattr(m, "pixel_shuffle"):
                    _override(m, "pixel_shuffle", _idefics3_pixel_shuffle, path, state, report,
                              "mmkernels.nn.Idefics3PixelShuffle (merge, fused)")
                elif cls == "InternVLModel" and hasattr(m, "pixel_shuffle"):
                    _override(m, "pixel_shuffle", _internvl_pixel_shuffle, path, state, report,
                              "mmkernels.nn.InternVLPixelShuffle (merge, fused)")
                    why = _internvl_fusion_mismatch(m)
                    if why:
                        report.skipped.append((path, cls, f"pixel shuffle + projector LayerNorm not fused ({why})"))
                    else:
                        _override(m, "get_image_features", _internvl_get_image_features_fn(), path, state, report,
                                  "pixel shuffle + multi_modal_projector.layer_norm in one mk.token_pool call "
                                  "(mmkernels.nn.InternVLPixelShuffle), projector MLP in torch")
        if qformer:
            for path, m in list(model.named_modules()):
                if type(m).__name__ in _QFORMER_ENCODER_CLASSES:
                    _share_qformer_kv(path, m, qformer_shared_kv, state, report)
        if prune is not None:
            from . import prune as _prune

            _prune.apply(model, prune, report, state.undo)
    except BaseException:
        _restore(state)
        raise
    if not report.num_patched:
        report.skipped.append(("", type(model).__name__, "nothing mmkernels knows how to patch"))
    state.report = report
    model.__dict__[_STATE_ATTR] = state
    return report


def _restore(state: _State) -> None:
    for undo in reversed(state.undo):
        undo()
    for parent, name, old in reversed(state.modules):
        parent._modules[name] = old
    for owner, name in reversed(state.methods):
        owner.__dict__.pop(name, None)
    for config, old in reversed(state.configs):
        config._attn_implementation_internal = old


def unpatch(model: nn.Module) -> PatchReport | None:
    """Undo :func:`patch` on ``model``: the original module objects, methods and attention
    implementations come back.  Returns the report of the patch undone (``None`` when the model
    was not patched)."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return None
    _restore(state)
    return state.report


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`patch` was applied to ``model`` (and not undone)."""
    return getattr(model, _STATE_ATTR, None) is not None

