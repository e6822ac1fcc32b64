"""Drop-in for HF's Q-Former attention (``Blip2QFormerMultiHeadAttention`` and
``InstructBlipQFormerMultiHeadAttention``): same parameters, state_dict keys, forward signature
and outputs; cross-attention runs the fused :func:`mmkernels.qformer_cross_attention`,
self-attention runs :func:`mmkernels.attention`.  :class:`QFormerSharedKV` projects K and V of
all cross-attention layers of one Q-Former with one GEMM per forward (installed by
:func:`mmkernels.patch`)."""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch import BackendNotSupportedError
from ..ops.attention import attention
from ..ops.qformer_cross_attention import (
    check_keep_mask_values,
    normalize_encoder_mask,
    qformer_cross_attention,
    route,
    shares_kv,
)
from ._checks import check_hf_module, is_int, is_linear, is_number

__all__ = ["QFormerAttention", "QFormerSharedKV"]


class QFormerAttention(nn.Module):
    """Q-Former multi-head attention (BLIP-2 / InstructBLIP), self- or cross-attention.

    ``QFormerAttention(config, is_cross_attention=False, *, backend=None)`` takes the HF
    ``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig`` (``hidden_size``,
    ``num_attention_heads``, ``encoder_hidden_size``, ``attention_probs_dropout_prob``) and
    builds ``query``/``key``/``value`` ``nn.Linear`` layers exactly as HF does, so state_dicts
    load either way.  :meth:`from_hf` wraps an existing HF module, sharing its layers.

    ``forward(hidden_states (B, Lq, Dq), attention_mask=None, encoder_hidden_states=None
    (B, Lk, Dkv), encoder_attention_mask=None, **kwargs) -> (context (B, Lq, A), None)``: the
    context before the output dense, as HF returns it.  Masks as HF passes them: the extended
    additive (B, 1, 1, L) / (B, 1, Lq, L) masks, bool SDPA masks, or a (B, Lk) keep mask for
    the encoder.  Attention dropout (``attention_probs_dropout_prob``) applies in training.
    The attention weights are not materialised (``None``, as with HF's sdpa/flash
    implementations); ``output_attentions=True`` in kwargs computes them on the reference
    path.  A module with relative position embeddings (older transformers releases) runs
    HF's own forward.

    Equivalent PyTorch: ``Blip2QFormerMultiHeadAttention(config, is_cross_attention)`` with
    ``config._attn_implementation = "eager"``.
    """

    def __init__(self, config, is_cross_attention: bool = False, *, backend: str | None = None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0 and not hasattr(config, "embedding_size"):
            raise ValueError(
                f"config: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                f"{config.num_attention_heads}"
            )
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = int(config.hidden_size / config.num_attention_heads)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_cross_attention = is_cross_attention
        self.backend = backend
        self._hf_forward = None
        self._shared_kv = None  # (QFormerSharedKV, index) while a patched Q-Former shares K/V
        kv_in = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_in, self.all_head_size)
        self.value = nn.Linear(kv_in, self.all_head_size)

    @classmethod
    def from_hf(cls, module: nn.Module, *, backend: str | None = None) -> "QFormerAttention":
        """A drop-in sharing ``module``'s ``query``/``key``/``value`` layers (same Parameters).

        ``module``: an HF ``Blip2QFormerMultiHeadAttention`` / ``InstructBlipQFormerMultiHeadAttention``
        (e.g. ``layer.crossattention.attention``); anything else raises ``ValueError``."""
        check_hf_module(
            "QFormerAttention.from_hf", "module",
            module, "an HF Blip2QFormerMultiHeadAttention / InstructBlipQFormerMultiHeadAttention",
            (("config", "a config", None),
             ("num_attention_heads", "a positive int", is_int),
             ("attention_head_size", "a positive int", is_int),
             ("all_head_size", "a positive int", is_int),
             ("attention_dropout", "a float", is_number),
             ("query", "an nn.Linear", is_linear),
             ("key", "an nn.Linear", is_linear),
             ("value", "an nn.Linear", is_linear)),
            children=("attention",))
        a = module.num_attention_heads * module.attention_head_size
        widths = {n: getattr(module, n).out_features for n in ("query", "key", "value")}
        if module.all_head_size != a or any(w != a for w in widths.values()):
            raise ValueError(
                f"module: QFormerAttention.from_hf expected query/key/value with num_attention_heads · "
                f"attention_head_size = {module.num_attention_heads} · {module.attention_head_size} = {a} outputs "
                f"(all_head_size {module.all_head_size}), got {type(module).__name__} with out_features {widths}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("config", "num_attention_heads", "attention_head_size", "all_head_size", "attention_dropout"):
            setattr(new, name, getattr(module, name))
        new.scaling = getattr(module, "scaling", new.attention_head_size**-0.5)
        new.is_causal = False
        new.is_cross_attention = module.key.in_features != module.query.in_features or getattr(
            module, "is_cross_attention", False)
        new.backend = backend
        new.query, new.key, new.value = module.query, module.key, module.value
        new._hf_forward = None
        new._shared_kv = None
        pos = getattr(module, "position_embedding_type", "absolute")
        if pos != "absolute":
            # relative_key(_query): keep HF's layers under their names and run HF's forward
            for name, child in module.named_children():
                if name not in ("query", "key", "value"):
                    new.add_module(name, child)
            for name in ("position_embedding_type", "max_position_embeddings", "save_attention"):
                if hasattr(module, name):
                    setattr(new, name, getattr(module, name))
            new._hf_forward = type(module).forward
            warnings.warn(
                f"QFormerAttention.from_hf: position_embedding_type={pos!r} is not fused; "
                "this module runs the reference (HF) forward", stacklevel=2)
        new.train(module.training)
        return new

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                **kwargs):
        if self._hf_forward is not None:
            return self._hf_forward(self, hidden_states, attention_mask, encoder_hidden_states=encoder_hidden_states,
                                    encoder_attention_mask=encoder_attention_mask, **kwargs)
        p = self.attention_dropout if self.training else 0.0
        if kwargs.get("output_attentions"):
            return self._reference(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, p)
        if encoder_hidden_states is not None:
            shared = getattr(self, "_shared_kv", None)
            if shared is not None:
                kv = shared[0].kv(shared[1], hidden_states, encoder_hidden_states, encoder_attention_mask, p)
                if kv is not None:
                    return self._cross_attention_on(hidden_states, *kv, encoder_attention_mask, p), None
            out = qformer_cross_attention(
                hidden_states, encoder_hidden_states, self.query.weight, self.query.bias, self.key.weight,
                self.key.bias, self.value.weight, self.value.bias, self.num_attention_heads,
                encoder_attention_mask=encoder_attention_mask, dropout_p=p, scale=self.scaling, backend=self.backend)
            return out, None
        b, length, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        q = self.query(hidden_states).view(b, length, h, d).transpose(1, 2)
        k = self.key(hidden_states).view(b, length, h, d).transpose(1, 2)
        v = self.value(hidden_states).view(b, length, h, d).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        out = attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scaling, backend=self.backend)
        return out.transpose(1, 2).reshape(b, length, h * d), None

    def _cross_attention_on(self, hidden_states, key, value, encoder_attention_mask, p):
        """Cross-attention on K/V projected elsewhere ((B or 1, H, Lk, d), e.g. views of the shared
        GEMM): this layer's Q projection, then :func:`mmkernels.attention` — what the hoisted path of
        :func:`mmkernels.qformer_cross_attention` runs after its own K/V GEMMs."""
        bx, lq, _ = hidden_states.shape
        h, d = self.num_attention_heads, self.attention_head_size
        b = max(bx, key.shape[0])
        q = F.linear(hidden_states, self.query.weight, self.query.bias).view(bx, lq, h, d).transpose(1, 2)
        q, key, value = (t.expand(b, -1, -1, -1) for t in (q, key, value))
        mask = encoder_attention_mask
        if mask is not None and mask.dim() == 1:
            mask = mask.view(1, 1, 1, -1)
        mask = normalize_encoder_mask(mask, hidden_states.dtype)
        out = attention(q, key, value, attn_mask=mask, dropout_p=p, scale=self.scaling, backend=self.backend)
        return out.transpose(1, 2).reshape(b, lq, h * d)

    def _reference(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, p):
        """HF's eager math, returning the attention probabilities too."""
        cross = encoder_hidden_states is not None
        states = encoder_hidden_states if cross else hidden_states
        mask = encoder_attention_mask if cross else attention_mask
        if cross and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            check_keep_mask_values(mask)  # as qformer_cross_attention checks it
        h, d = self.num_attention_heads, self.attention_head_size
        q = self.query(hidden_states).view(*hidden_states.shape[:2], h, d).transpose(1, 2)
        k = self.key(states).view(*states.shape[:2], h, d).transpose(1, 2)
        v = self.value(states).view(*states.shape[:2], h, d).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling
        mask = normalize_encoder_mask(mask, scores.dtype)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        probs = F.dropout(scores.softmax(-1), p=p, training=self.training)
        out = torch.matmul(probs, v).transpose(1, 2)
        return out.reshape(*out.shape[:2], -1).contiguous(), probs


def _version(t: torch.Tensor):
    """``t``'s in-place version counter (None for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class _Scope:
    """One Q-Former forward: the image features it was entered with, and the layers' K/V once projected."""

    __slots__ = ("encoder_hidden_states", "version", "parts", "failed")

    def __init__(self, encoder_hidden_states):
        self.encoder_hidden_states = encoder_hidden_states
        self.version = None if encoder_hidden_states is None else _version(encoder_hidden_states)
        self.parts = None
        self.failed = False


class QFormerSharedKV:
    r"""K and V of every cross-attention layer of one Q-Former from ONE GEMM per forward.

    BLIP-2's Q-Former has 12 layers; every ``cross_attention_frequency``-th (2: n = 6 layers) has a
    cross-attention whose key/value Linears (Dkv → A, 1408 → 768) all read the same image features
    (B, Lk, Dkv) = (B, 257, 1408).  Inside :meth:`scope` — entered by the patched Q-Former
    encoder's ``forward`` for exactly that forward — the first layer that needs K/V projects those
    of every layer at once::

        W = cat([Wk_0, Wv_0, Wk_1, Wv_1, ..., Wv_{n-1}])      # (n·2·A, Dkv)
        b = cat([bk_0, bv_0, ..., bv_{n-1}])                  # (n·2·A,)
        kv = F.linear(encoder_hidden_states, W, b)            # (B, Lk, n·2·A): one GEMM
        K_i, V_i = kv[..., (2i)·A:(2i+1)·A], kv[..., (2i+1)·A:(2i+2)·A]   # as (B, H, Lk, d) views

    and layer i runs its own Q projection and :func:`mmkernels.attention` on ``K_i, V_i`` (views:
    no copies).  Autograd goes through ``torch.cat`` of the Parameters, so every layer's key/value
    weights and biases and the image features get their gradients, from one GEMM each (dW, dX)
    instead of 2n; the layers' dK/dV land in one buffer (the split's backward is one concatenation).

    Equivalent per layer: ``mmkernels.qformer_cross_attention(x_i, encoder_hidden_states, Wq_i, bq_i,
    Wk_i, bk_i, Wv_i, bv_i, H, mask, p)`` on the hoisted / SDPA path, equal to fp32 rounding
    (the K/V GEMM has another width, so its summation may be split differently); dropout draws the
    same seed from torch's generator in the same order, so a seeded run drops the same
    probabilities as the per-layer mmkernels path.

    Which calls share (``mode``): None (auto) — :func:`mmkernels.ops.qformer_cross_attention.shares_kv`: on the
    Triton route wherever the per-layer call would be the hoisted path rather than the fused kernel
    (batch >= ``SHARED_KV_MIN_BATCH``, default ``HOIST_MIN_BATCH``), on SDPA / the reference on a
    GPU, not on a CPU (no gain measured there; ``SHARED_KV_ON_CPU``) — estimates a GPU benchmark
    overrules; True — always (forcing the layers off the fused kernel); False — never.  Assign
    ``mode`` at any time.

    A layer projects its own K/V (never a stale one) when: no scope is open (the module called
    outside its Q-Former's forward), its ``encoder_hidden_states`` is not the very tensor the
    scope was opened with, or that tensor was modified in place since, or the weights' dtype /
    device / width do not match it.  ``cache_weights`` (default True): without autograd (eval under
    ``torch.no_grad`` / ``inference_mode``, or frozen weights) the concatenated W and b are kept
    and reused while every key/value Parameter keeps its identity, storage and version counter
    (an optimizer step, ``load_state_dict`` or ``.to()`` invalidates them); they cost one more copy
    of the K/V weights (BLIP-2 fp32: 6·2·768·1408·4 B = 52 MB).  With autograd they are
    concatenated per forward (the graph needs the cat) and the cache is dropped.

    Memory: in training the product (B, Lk, n·2·A) lives until the backward (BLIP-2 fp32: 9.5 MB
    per image, 607 MB at B=64), as the hoisted path's per-layer K/V do; the fused path keeps none
    (its backward recomputes them), one more reason it keeps the small batches.

    One forward at a time per model: the scope is per instance, not per thread.

    :func:`mmkernels.patch` installs it (``encoder.mmkernels_shared_kv``); by hand, on Q-Former
    cross-attention layers that are already :class:`QFormerAttention`::

        shared = QFormerSharedKV([l.crossattention.attention for l in qformer.encoder.layer
                                  if l.has_cross_attention])
        shared.attach()
        with shared.scope(image_embeds):   # the very tensor the layers will get
            out = qformer.encoder(embeddings, mask, image_embeds, query_length=32)
        shared.detach()
    """

    def __init__(self, layers, mode: bool | None = None, *, cache_weights: bool = True):
        layers = list(layers)
        if not layers:
            raise ValueError("layers: expected at least one cross-attention QFormerAttention, got none")
        for i, m in enumerate(layers):
            if not isinstance(m, QFormerAttention) or not m.is_cross_attention:
                raise ValueError(f"layers[{i}]: expected a cross-attention QFormerAttention, got {type(m).__name__}")
        if mode not in (None, True, False):
            raise ValueError(f"mode: expected None (auto), True or False, got {mode!r}")
        self.layers = layers
        self.mode = mode
        self.cache_weights = cache_weights
        self.projections = 0  # shared GEMMs run (a counter for tests and curious users)
        self._scopes: list[_Scope] = []
        self._cache = None  # (key, W, b)

    def attach(self) -> None:
        """Point each layer at this object (its cross-attention then asks :meth:`kv` first)."""
        for i, m in enumerate(self.layers):
            m._shared_kv = (self, i)

    def detach(self) -> None:
        """Undo :meth:`attach` and drop the weight cache."""
        for m in self.layers:
            if getattr(m, "_shared_kv", None) is not None and m._shared_kv[0] is self:
                m._shared_kv = None
        self._cache = None
        self._scopes.clear()

    @contextlib.contextmanager
    def scope(self, encoder_hidden_states: torch.Tensor | None):
        """K/V projected inside the block are valid for ``encoder_hidden_states`` (this very tensor,
        unmodified) and dropped on exit — the lifetime of one Q-Former forward."""
        sc = _Scope(encoder_hidden_states)
        self._scopes.append(sc)
        try:
            yield sc
        finally:
            self._scopes.remove(sc)
            sc.parts = None

    @property
    def active(self) -> bool:
        """Whether a scope with image features is open (K/V may be held)."""
        return bool(self._scopes) and self._scopes[-1].encoder_hidden_states is not None

    def kv(self, index: int, hidden_states, encoder_hidden_states, encoder_attention_mask, dropout_p):
        """(K, V) of layer ``index`` as (B, H, Lk, d) views of the shared GEMM, or None when this call
        must project its own (see the class docstring)."""
        if not self._scopes or self.mode is False:
            return None
        sc = self._scopes[-1]
        enc = sc.encoder_hidden_states
        if enc is None or encoder_hidden_states is not enc or sc.failed or _version(enc) != sc.version:
            return None
        m = self.layers[index]
        try:  # the per-layer op's validation and backend choice: bad input raises there, not here
            backend = route(hidden_states, enc, m.query.weight, m.query.bias, m.key.weight, m.key.bias,
                            m.value.weight, m.value.bias, m.num_attention_heads, encoder_attention_mask,
                            dropout_p, m.scaling, backend=m.backend)
        except (ValueError, BackendNotSupportedError):
            return None
        if self.mode is None and not shares_kv(backend, max(hidden_states.shape[0], enc.shape[0]), enc.device):
            return None
        if sc.parts is None:
            sc.parts = self._project(enc)
            if sc.parts is None:
                sc.failed = True
                return None
        return sc.parts[index]

    def _compatible(self, enc) -> bool:
        for m in self.layers:
            for lin in (m.key, m.value):
                if (lin.weight.dim() != 2 or lin.weight.shape != (m.all_head_size, enc.shape[-1])
                        or lin.weight.dtype != enc.dtype or lin.weight.device != enc.device):
                    return False
        return True

    def _project(self, enc):
        if not self._compatible(enc):
            return None
        weight, bias = self.weights()
        kv = F.linear(enc, weight, bias)
        self.projections += 1
        pieces = kv.split([m.all_head_size for m in self.layers for _ in (0, 1)], dim=-1)
        parts = []
        for i, m in enumerate(self.layers):
            h, d = m.num_attention_heads, m.attention_head_size
            k, v = (t.unflatten(-1, (h, d)).transpose(1, 2) for t in pieces[2 * i:2 * i + 2])
            parts.append((k, v))
        return parts

    def _params(self):
        return [p for m in self.layers for lin in (m.key, m.value) for p in (lin.weight, lin.bias)]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The concatenated key/value weights (n·2·A, Dkv) and biases (n·2·A,) (None when no layer
        has one; a missing bias among others counts as zeros), cached as the class docstring says."""
        params = self._params()
        graph = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
        if graph or not self.cache_weights:
            self._cache = None
            return self._concatenate()
        key = tuple(None if p is None else (id(p), _version(p), p.data_ptr(), p.dtype, p.device, tuple(p.shape))
                    for p in params)
        cached = self._cache
        if (cached is not None and cached[0] == key and None not in (_version(p) for p in params if p is not None)
                and not (torch.is_grad_enabled() and cached[1].is_inference())):
            return cached[1], cached[2]
        weight, bias = self._concatenate()
        self._cache = (key, weight, bias)
        return weight, bias

    def _concatenate(self):
        weights, biases = [], []
        for m in self.layers:
            for lin in (m.key, m.value):
                weights.append(lin.weight)
                biases.append(lin.bias)
        weight = torch.cat(weights)
        if all(b is None for b in biases):
            return weight, None
        bias = torch.cat([torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                          for w, b in zip(weights, biases)])
        return weight, bias
