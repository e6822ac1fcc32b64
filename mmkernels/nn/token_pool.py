"""Token-pooling modules on :func:`mmkernels.token_pool`, and drop-ins for the VLM stages it fuses.

* :class:`TokenPooler` — the op as a configurable module with optional norm parameters.
* Drop-ins, each equal to the transformers module / method it replaces (tests check them
  against the real classes with random weights), each with ``from_hf(...)`` that shares the
  original's parameters (same ``Parameter`` objects, same ``state_dict`` keys):

  ==============================  ==================================================================
  :class:`Gemma3MultiModalProjector`  ``Gemma3MultiModalProjector``: avg k×k + Gemma3RMSNorm fused,
                                  then ``torch.matmul`` with ``mm_input_projection_weight`` (cuBLAS)
  :class:`LlavaOnevisionPooling`  ``LlavaOnevisionModel.apply_pooling``: bilinear h×w → ⌈h/2⌉×⌈w/2⌉
  :class:`InternVLPixelShuffle`   InternVL's ``pixel_shuffle`` (+ the projector's LayerNorm, shared)
  :class:`Idefics3PixelShuffle`   ``Idefics3Connector.pixel_shuffle`` / ``SmolVLMConnector.pixel_shuffle``
  :class:`LlavaNextVideoPooler`   ``LlavaNextVideoPooler`` (average / max fused; conv runs eagerly)
  :class:`Qwen2VLPatchMerger`     Qwen2-VL ``PatchMerger`` / ``Qwen2_5_VLPatchMerger``: ``ln_q``
                                  fused (the 2×2 merge of pre-grouped tokens is a view), MLP in torch
  ==============================  ==================================================================

Precision: the fused paths compute in fp32 and round once.  In float32 they match the HF
modules to rounding; in bfloat16/float16 they skip the HF chains' intermediate roundings
(the pooled tensor before the norm; Qwen2.5's RMSNorm output before its weight), so they differ
from them by about one unit in the last place — towards the exact result.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import dispatch
from ..ops.token_pool import check_options, make_spec, token_pool
from ._checks import check_hf_module, is_int, is_linear, is_norm, is_number

__all__ = [
    "Gemma3MultiModalProjector",
    "Idefics3PixelShuffle",
    "InternVLPixelShuffle",
    "LlavaNextVideoPooler",
    "LlavaOnevisionPooling",
    "Qwen2VLPatchMerger",
    "RMSNorm",
    "TokenPooler",
]


class RMSNorm(nn.Module):
    """Parameter holder for an RMSNorm ``x·rsqrt(mean(x²) + eps)·weight`` (fused by the poolers).

    ``forward`` is the plain-PyTorch form (fp32 compute, one rounding) for standalone use.
    ``offset=1.0`` gives Gemma's ``(1 + weight)`` form (weight initialised to 0).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.offset = offset
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(dim, device=device, dtype=dtype))

    def effective_weight(self) -> torch.Tensor:
        """The multiplier the fused kernel applies: ``offset + weight`` in fp32 when offset != 0."""
        return self.weight if not self.offset else self.offset + self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.effective_weight().float()).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


def _norm_of(module: nn.Module | None):
    """(kind, weight, bias, eps) of a LayerNorm / RMSNorm-like module (HF's or ours)."""
    if module is None:
        return None, None, None, 1e-6
    if isinstance(module, nn.LayerNorm):
        return "layernorm", module.weight, module.bias, module.eps
    if isinstance(module, RMSNorm):
        return "rmsnorm", module.effective_weight(), None, module.eps
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None or not hasattr(module, "weight"):
        raise ValueError(f"norm: expected a LayerNorm or an RMSNorm module, got {type(module).__name__}")
    if type(module).__name__.startswith("Gemma"):
        return "rmsnorm", 1.0 + module.weight.float(), None, eps
    return "rmsnorm", module.weight, getattr(module, "bias", None), eps


class TokenPooler(nn.Module):
    """:func:`mmkernels.token_pool` as a module: (B, N, C) → (B, keep_cls + h'·w', C_out).

    With ``norm`` ("layernorm" / "rmsnorm") and ``elementwise_affine`` (default), ``weight``
    (ones) and — for layernorm by default — ``bias`` (zeros) of size ``norm_dim`` (the output
    width: C, or kernel_size²·C for ``merge``) are parameters.  ``grid`` may be fixed here or
    passed per call (inferred when square).  Everything else as in :func:`mmkernels.token_pool`.
    The options are checked at construction (``ValueError`` naming the argument; with a fixed
    ``grid`` the geometry too), not at the first forward.
    """

    def __init__(self, mode: str = "avg", kernel_size=2, stride=None, output_size=None, *, grid=None,
                 has_cls: bool = False, keep_cls: bool = False, norm: str | None = None, norm_dim: int | None = None,
                 eps: float = 1e-6, elementwise_affine: bool = True, bias: bool | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        # every option is checked here, not at the first forward (ValueError naming the argument)
        check_options(grid=grid, mode=mode, kernel_size=kernel_size, stride=stride, output_size=output_size,
                      has_cls=has_cls, keep_cls=keep_cls, norm=norm, eps=eps)
        if grid is not None:  # the geometry too (window vs grid, merge divisibility), on a meta stand-in
            h, w = (grid, grid) if isinstance(grid, int) else grid
            make_spec(torch.empty(1, int(has_cls) + h * w, 1, device="meta"), grid=grid, mode=mode,
                      kernel_size=kernel_size, stride=stride, output_size=output_size, has_cls=has_cls,
                      keep_cls=keep_cls, norm=norm, eps=eps)
        if norm_dim is not None and not is_int(norm_dim):
            raise ValueError(f"norm_dim: expected a positive int (the output width) or None, got {norm_dim!r}")
        for name, flag in (("elementwise_affine", elementwise_affine), ("bias", bias)):
            if not (isinstance(flag, bool) or (name == "bias" and flag is None)):
                raise ValueError(f"{name}: expected a bool{' or None' if name == 'bias' else ''}, got {flag!r}")
        if backend is not None:
            dispatch.forced_backend(backend)  # an unknown name raises ValueError
        self.mode, self.kernel_size, self.stride, self.output_size = mode, kernel_size, stride, output_size
        self.grid, self.has_cls, self.keep_cls = grid, has_cls, keep_cls
        self.norm, self.eps, self.backend = norm, eps, backend
        self.weight = self.bias = None
        if norm is not None and elementwise_affine:
            if norm_dim is None:
                raise ValueError("norm_dim: needed with a norm and elementwise_affine=True (the output width)")
            factory = dict(device=device, dtype=dtype)
            self.weight = nn.Parameter(torch.ones(norm_dim, **factory))
            if bias if bias is not None else norm == "layernorm":
                self.bias = nn.Parameter(torch.zeros(norm_dim, **factory))

    def forward(self, x: torch.Tensor, grid=None) -> torch.Tensor:
        return token_pool(
            x, grid=grid if grid is not None else self.grid, mode=self.mode, kernel_size=self.kernel_size,
            stride=self.stride, output_size=self.output_size, has_cls=self.has_cls, keep_cls=self.keep_cls,
            norm=self.norm, norm_weight=self.weight, norm_bias=self.bias, eps=self.eps, backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"mode={self.mode!r}"]
        if self.mode != "bilinear":
            parts.append(f"kernel_size={self.kernel_size}")
        for name in ("stride", "output_size", "grid", "norm"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)!r}")
        if self.has_cls:
            parts.append(f"has_cls=True, keep_cls={self.keep_cls}")
        return ", ".join(parts)


class Gemma3MultiModalProjector(nn.Module):
    """Drop-in for transformers' ``Gemma3MultiModalProjector``.

    (B, p², C_vision) → (B, t², C_text) with p = patches per side (64 for 896 px), t = tokens
    per side (16): ``AvgPool2d(p/t)`` + ``Gemma3RMSNorm`` fused into one pass (weight (1 + w),
    fp32 compute, one rounding), then ``matmul(·, mm_input_projection_weight)`` in torch.
    Same parameters and ``state_dict`` keys as the HF module.
    """

    def __init__(self, vision_hidden_size: int, text_hidden_size: int, patches_per_image: int,
                 tokens_per_side: int, eps: float = 1e-6, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.mm_input_projection_weight = nn.Parameter(
            torch.zeros(vision_hidden_size, text_hidden_size, device=device, dtype=dtype))
        self.mm_soft_emb_norm = RMSNorm(vision_hidden_size, eps=eps, offset=1.0, device=device, dtype=dtype)
        self.patches_per_image = int(patches_per_image)
        self.tokens_per_side = int(tokens_per_side)
        self.kernel_size = self.patches_per_image // self.tokens_per_side
        self.backend = backend

    @classmethod
    def from_config(cls, config, **kwargs) -> "Gemma3MultiModalProjector":
        v = config.vision_config
        return cls(v.hidden_size, config.text_config.hidden_size, v.image_size // v.patch_size,
                   int(config.mm_tokens_per_image ** 0.5), eps=v.layer_norm_eps, **kwargs)

    @classmethod
    def from_hf(cls, module: nn.Module, backend: str | None = None) -> "Gemma3MultiModalProjector":
        """Wrap an HF ``Gemma3MultiModalProjector``, sharing its parameters."""
        check_hf_module(
            "Gemma3MultiModalProjector.from_hf", "module", module, "an HF Gemma3MultiModalProjector",
            (("mm_input_projection_weight", "a 2-D tensor", lambda w: isinstance(w, torch.Tensor) and w.dim() == 2),
             ("mm_soft_emb_norm", "an RMSNorm", is_norm),
             ("mm_soft_emb_norm.eps", "a float", is_number),
             ("patches_per_image", "a positive int", is_int),
             ("tokens_per_side", "a positive int", is_int)),
            children=("multi_modal_projector",))
        w = module.mm_input_projection_weight
        new = cls(w.shape[0], w.shape[1], module.patches_per_image, module.tokens_per_side,
                  eps=module.mm_soft_emb_norm.eps, backend=backend, device="meta")
        new.mm_input_projection_weight = w
        new.mm_soft_emb_norm.weight = module.mm_soft_emb_norm.weight
        return new

    def pool_norm(self, vision_outputs: torch.Tensor) -> torch.Tensor:
        """The fused stage: (B, p², C) → RMSNorm(avg_pool(·)) of shape (B, t², C), input dtype."""
        p = self.patches_per_image
        return token_pool(vision_outputs, grid=(p, p), mode="avg", kernel_size=self.kernel_size, norm="rmsnorm",
                          norm_weight=self.mm_soft_emb_norm.effective_weight(), eps=self.mm_soft_emb_norm.eps,
                          backend=self.backend)

    def forward(self, vision_outputs: torch.Tensor) -> torch.Tensor:
        normed = self.pool_norm(vision_outputs)
        return torch.matmul(normed, self.mm_input_projection_weight).type_as(vision_outputs)


class LlavaOnevisionPooling(nn.Module):
    """Drop-in for ``LlavaOnevisionModel.apply_pooling``: (B·frames, h·w, C) →
    (B·frames, ⌈h/2⌉·⌈w/2⌉, C) by ``F.interpolate(mode="bilinear", align_corners=False)``
    (SigLIP-384/14: 27×27 → 14×14).  No parameters."""

    def __init__(self, height: int, width: int | None = None, backend: str | None = None):
        super().__init__()
        self.height, self.width = int(height), int(width if width is not None else height)
        self.backend = backend

    @classmethod
    def from_config(cls, config, backend: str | None = None) -> "LlavaOnevisionPooling":
        side = config.vision_config.image_size // config.vision_config.patch_size
        return cls(side, side, backend=backend)

    @classmethod
    def from_hf(cls, model: nn.Module, backend: str | None = None) -> "LlavaOnevisionPooling":
        """From an HF LLaVA-OneVision model (its ``config``); ``apply_pooling`` is a method."""
        check_hf_module(
            "LlavaOnevisionPooling.from_hf", "model", model,
            "an HF LLaVA-OneVision model (config.vision_config.image_size / patch_size)",
            (("config.vision_config.image_size", "a positive int", is_int),
             ("config.vision_config.patch_size", "a positive int", is_int)))
        return cls.from_config(model.config, backend=backend)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        h, w = self.height, self.width
        return token_pool(image_features, grid=(h, w), mode="bilinear",
                          output_size=(math.ceil(h / 2), math.ceil(w / 2)), backend=self.backend)

    def extra_repr(self) -> str:
        return f"height={self.height}, width={self.width}"


class InternVLPixelShuffle(nn.Module):
    """InternVL's ``pixel_shuffle(·, downsample_ratio)`` on (B, N, C) tokens, plus — when given —
    the LayerNorm that opens its projector (HF ``multi_modal_projector.layer_norm``, original
    ``mlp1[0]``), fused: (B, N, C) → (B, N·r², C/r²) with channel order (di, dj, c).

    Replaces ``pixel_shuffle(x.reshape(B, f, f, C), r).reshape(B, -1, C/r²)`` followed by that
    LayerNorm; the projector's Linear → act → Linear stay in torch.  ``has_cls`` reads past
    token 0 (the "default" feature-select strategy's ``[:, 1:]``) without a copy.
    """

    def __init__(self, downsample_ratio: float = 0.5, layer_norm: nn.Module | None = None,
                 has_cls: bool = False, backend: str | None = None):
        super().__init__()
        factor = round(1 / downsample_ratio)
        if abs(factor * downsample_ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio: expected 1/k for an integer k, got {downsample_ratio!r}")
        self.downsample_ratio, self.factor = downsample_ratio, factor
        self.layer_norm = layer_norm
        self.has_cls, self.backend = has_cls, backend

    @classmethod
    def from_hf(cls, module: nn.Module, downsample_ratio: float | None = None, has_cls: bool = False,
                backend: str | None = None) -> "InternVLPixelShuffle":
        """From an HF ``InternVLModel`` (ratio from its config, norm from ``multi_modal_projector``),
        an ``InternVLMultiModalProjector``, or an original ``mlp1`` ``nn.Sequential``; shares the norm."""
        expected = ("an HF InternVLModel, an InternVLMultiModalProjector (with .layer_norm) or the original "
                    "mlp1 nn.Sequential(LayerNorm, Linear, GELU, Linear)")
        given = type(module).__name__
        if hasattr(module, "multi_modal_projector"):
            if downsample_ratio is None:
                check_hf_module("InternVLPixelShuffle.from_hf", "module", module, expected,
                                (("config.downsample_ratio", "a float", is_number),))
                downsample_ratio = module.config.downsample_ratio
            module = module.multi_modal_projector
        if isinstance(module, nn.Sequential) and len(module) and isinstance(module[0], nn.LayerNorm):
            norm = module[0]
        elif is_norm(getattr(module, "layer_norm", None)):
            norm = module.layer_norm
        else:
            what = "an nn.Sequential not starting with a LayerNorm" if isinstance(module, nn.Sequential) else (
                "no .layer_norm norm module")
            raise ValueError(f"module: InternVLPixelShuffle.from_hf expected {expected}, got {given} ({what}); "
                             "without a norm, build InternVLPixelShuffle(downsample_ratio)")
        return cls(0.5 if downsample_ratio is None else downsample_ratio, norm, has_cls=has_cls, backend=backend)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        kind, weight, bias, eps = _norm_of(self.layer_norm)
        return token_pool(vision_features, mode="merge", kernel_size=self.factor, has_cls=self.has_cls,
                          norm=kind, norm_weight=weight, norm_bias=bias, eps=eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"downsample_ratio={self.downsample_ratio}, has_cls={self.has_cls}"


class Idefics3PixelShuffle(nn.Module):
    """Drop-in for ``Idefics3Connector.pixel_shuffle(x, scale_factor)`` (SmolVLM's is the same):
    (B, s², C) → (B, s²/f², f²·C), channel order (di, dj, c).  No parameters."""

    def __init__(self, scale_factor: int = 2, backend: str | None = None):
        super().__init__()
        self.scale_factor, self.backend = int(scale_factor), backend

    @classmethod
    def from_hf(cls, connector: nn.Module, backend: str | None = None) -> "Idefics3PixelShuffle":
        """From an HF ``Idefics3Connector`` / ``SmolVLMConnector`` (its ``scale_factor``)."""
        check_hf_module("Idefics3PixelShuffle.from_hf", "connector", connector,
                        "an HF Idefics3Connector / SmolVLMConnector", (("scale_factor", "a positive int", is_int),),
                        children=("connector",))
        return cls(connector.scale_factor, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_pool(x, mode="merge", kernel_size=self.scale_factor, backend=self.backend)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}"


class LlavaNextVideoPooler(nn.Module):
    """Drop-in for transformers' ``LlavaNextVideoPooler``: (B·frames, s², C) → (B·frames,
    (s/k)², C') by average / max pooling k×k (fused) or a k×k stride-k conv (the HF conv module,
    run eagerly: a GEMM, not a pooling)."""

    def __init__(self, mode: str = "average", stride: int = 2, conv: nn.Module | None = None,
                 backend: str | None = None):
        super().__init__()
        if mode not in ("average", "max", "conv"):
            raise ValueError(f"mode: expected 'average', 'max' or 'conv', got {mode!r}")
        if (mode == "conv") != (conv is not None):
            raise ValueError("conv: pass the Conv2d module exactly when mode='conv'")
        self.mode, self.stride, self.backend = mode, int(stride), backend
        self.pool = conv

    @classmethod
    def from_hf(cls, pooler: nn.Module, backend: str | None = None) -> "LlavaNextVideoPooler":
        """From an HF ``LlavaNextVideoPooler`` (its ``pool``: AvgPool2d / MaxPool2d / Conv2d)."""
        check_hf_module("LlavaNextVideoPooler.from_hf", "pooler", pooler,
                        "an HF LlavaNextVideoPooler (.pool: AvgPool2d, MaxPool2d or Conv2d)",
                        (("pool", "an AvgPool2d, MaxPool2d or Conv2d",
                          lambda p: isinstance(p, (nn.AvgPool2d, nn.MaxPool2d, nn.Conv2d))),),
                        children=("vision_resampler",))
        pool = pooler.pool
        k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        if isinstance(pool, nn.AvgPool2d):
            return cls("average", k, backend=backend)
        if isinstance(pool, nn.MaxPool2d):
            return cls("max", k, backend=backend)
        if isinstance(pool, nn.Conv2d):
            return cls("conv", k, conv=pool, backend=backend)
        raise ValueError(f"pooler: unknown pool module {type(pool).__name__}")

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        b, n, dim = image_features.shape
        side = int(math.sqrt(n))
        if self.mode == "conv":  # the HF chain
            img = image_features.view(b, side, side, dim).permute(0, 3, 1, 2)
            return self.pool(img).flatten(2).transpose(1, 2).contiguous()
        return token_pool(image_features, grid=(side, side), mode="avg" if self.mode == "average" else "max",
                          kernel_size=self.stride, backend=self.backend)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, stride={self.stride}"


class Qwen2VLPatchMerger(nn.Module):
    """Drop-in for Qwen2-VL's ``PatchMerger`` (``ln_q`` = LayerNorm) and Qwen2.5-VL's
    ``Qwen2_5_VLPatchMerger`` (``ln_q`` = RMSNorm): (L, C) → (L/m², dim).

    The vision tower emits tokens already grouped m×m (the processor orders patches so), so
    the merge is ``view(-1, m²·C)``: the fused op runs ``ln_q`` over each C-channel token in one
    pass (``mode="merge"``, ``kernel_size=1``), the view is free, and the MLP (Linear → GELU →
    Linear) stays in torch (cuBLAS).  Same submodules and ``state_dict`` keys as the HF module.
    """

    def __init__(self, dim: int, context_dim: int, spatial_merge_size: int = 2, norm: str = "layernorm",
                 eps: float = 1e-6, backend: str | None = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.hidden_size = context_dim * spatial_merge_size ** 2
        if norm == "layernorm":
            self.ln_q = nn.LayerNorm(context_dim, eps=eps, **factory)
        elif norm == "rmsnorm":
            self.ln_q = RMSNorm(context_dim, eps=eps, **factory)
        else:
            raise ValueError(f"norm: expected 'layernorm' or 'rmsnorm', got {norm!r}")
        self.mlp = nn.Sequential(nn.Linear(self.hidden_size, self.hidden_size, **factory), nn.GELU(),
                                 nn.Linear(self.hidden_size, dim, **factory))
        self.backend = backend

    @classmethod
    def from_hf(cls, merger: nn.Module, backend: str | None = None) -> "Qwen2VLPatchMerger":
        """Wrap an HF patch merger, sharing its ``ln_q`` and ``mlp`` modules."""
        check_hf_module(
            "Qwen2VLPatchMerger.from_hf", "merger", merger, "an HF Qwen2-VL PatchMerger / Qwen2_5_VLPatchMerger",
            (("ln_q", "a LayerNorm or an RMSNorm", is_norm),
             ("mlp", "an nn.Sequential ending in an nn.Linear",
              lambda m: isinstance(m, nn.Sequential) and len(m) > 0 and is_linear(m[-1])),
             ("hidden_size", "a positive int", is_int)),
            children=("merger",))
        kind, _, _, eps = _norm_of(merger.ln_q)
        context_dim = merger.ln_q.weight.shape[0]
        merge = math.isqrt(merger.hidden_size // context_dim)
        new = cls(merger.mlp[-1].out_features, context_dim, merge, norm=kind, eps=eps, backend=backend, device="meta")
        new.ln_q, new.mlp = merger.ln_q, merger.mlp
        return new

    def norm_merge(self, x: torch.Tensor) -> torch.Tensor:
        """``ln_q(x).view(-1, hidden_size)``, fused: (L, C) → (L/m², m²·C)."""
        kind, weight, bias, eps = _norm_of(self.ln_q)
        seq, c = x.shape
        y = token_pool(x.unsqueeze(0), grid=(seq, 1), mode="merge", kernel_size=1, norm=kind,
                       norm_weight=weight, norm_bias=bias, eps=eps, backend=self.backend)
        return y.view(-1, self.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm_merge(x))
