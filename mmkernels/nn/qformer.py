"""Drop-in for HF's Q-Former attention (``Blip2QFormerMultiHeadAttention`` and
``InstructBlipQFormerMultiHeadAttention``): same parameters, state_dict keys, forward signature
and outputs; cross-attention runs the fused :func:`mmkernels.qformer_cross_attention`,
self-attention runs :func:`mmkernels.attention`."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import attention
from ..ops.qformer import normalize_encoder_mask, qformer_cross_attention

__all__ = ["QFormerAttention"]


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
        kv_in = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(kv_in, self.all_head_size)
        self.value = nn.Linear(kv_in, self.all_head_size)

    @classmethod
    def from_hf(cls, module: nn.Module, *, backend: str | None = None) -> "QFormerAttention":
        """A drop-in sharing ``module``'s ``query``/``key``/``value`` layers (same Parameters)."""
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

    def _reference(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, p):
        """HF's eager math, returning the attention probabilities too."""
        cross = encoder_hidden_states is not None
        states = encoder_hidden_states if cross else hidden_states
        mask = encoder_attention_mask if cross else attention_mask
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
