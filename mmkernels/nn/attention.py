"""``MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on ``mmkernels.attention``.

Same constructor, parameters, initialisation, ``state_dict`` keys and ``forward`` contract as
torch's module (it subclasses it); only the attention core changes.  With
``need_weights=False`` the forward projects Q/K/V with ``F.linear`` (one fused GEMM for
self-attention), folds ``key_padding_mask`` and ``attn_mask`` into one SDPA-convention mask,
runs :func:`mmkernels.attention` (Triton / SDPA / reference, see :mod:`mmkernels.dispatch`)
and applies ``out_proj``.  ``need_weights=True`` (torch's default) needs the probability
matrix, which a fused kernel never forms, so it runs torch's own forward, silently.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ..ops.attention import attention as _attention

__all__ = ["MultiheadAttention"]

_warned: set[str] = set()


def _warn_once(text: str) -> None:
    if text in _warned:
        return
    _warned.add(text)
    warnings.warn(text, stacklevel=3)


def _check_mask_type(mask: Tensor | None, name: str) -> None:
    # torch: F._canonical_mask, same exception type and text
    if mask is not None and mask.dtype != torch.bool and not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")


def _check_float_mask_dtype(mask: Tensor | None, name: str, dtype: torch.dtype) -> None:
    # torch's module raises this (a RuntimeError from SDPA) for a float mask of another dtype
    if mask is not None and mask.dtype != torch.bool and mask.dtype != dtype:
        raise RuntimeError(f"{name}: expected dtype torch.bool or {dtype} (the query's), got {mask.dtype}")


def _sdpa_mask(attn_mask: Tensor | None, key_padding_mask: Tensor | None, b: int, h: int, lq: int,
               lk: int) -> Tensor | None:
    """One mask in SDPA convention (bool True = attend, or additive float), broadcastable to
    (B, H, Lq, Lk), from torch MHA's masks (bool True = do NOT attend, or additive float).

    A single mask is used as is (a bool one is inverted); two are combined into one tensor of
    their broadcast shape — torch's module materialises (B·H, Lq, Lk) floats in that case.
    """
    am = None
    if attn_mask is not None:
        am = attn_mask.reshape(b, h, lq, lk) if attn_mask.dim() == 3 else attn_mask  # 2-D (Lq, Lk) broadcasts
    pm = key_padding_mask.reshape(b, 1, 1, lk) if key_padding_mask is not None else None
    if am is None and pm is None:
        return None
    if am is None or pm is None:
        m = am if am is not None else pm
        return ~m if m.dtype == torch.bool else m
    if am.dtype == torch.bool and pm.dtype == torch.bool:
        return torch.logical_or(am, pm).logical_not_()
    if am.dtype == torch.bool:
        return torch.where(am, float("-inf"), pm)
    if pm.dtype == torch.bool:
        return torch.where(pm, float("-inf"), am)
    return am + pm


class MultiheadAttention(nn.MultiheadAttention):
    r"""Drop-in for :class:`torch.nn.MultiheadAttention` running :func:`mmkernels.attention`.

    Constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight`` when ``kdim``/``vdim``
    differ from ``embed_dim``, ``in_proj_bias``, ``out_proj.weight/bias``, ``bias_k/bias_v``),
    initialisation and ``state_dict`` keys are torch's: checkpoints load both ways.  Extra
    keyword ``backend``: None (auto, or ``mmkernels.use_backend`` / ``MMKERNELS_BACKEND``),
    "triton", "cuda", "sdpa" or "reference"; a forced backend that cannot run a call raises.
    Use :meth:`from_torch` to wrap an existing module without copying its parameters.

    Shapes (E = embed_dim, N = batch, L = target length, S = source length, H = num_heads)::

        query      (L, N, E)   | (N, L, E) if batch_first | (L, E) unbatched
        key        (S, N, kdim)| (N, S, kdim)             | (S, kdim)
        value      (S, N, vdim)| (N, S, vdim)             | (S, vdim)
        key_padding_mask (N, S) | (S,) unbatched: bool True = ignore that key, or additive float
        attn_mask  (L, S) or (N·H, L, S) | (H, L, S) unbatched: bool True = NOT allowed
                   (torch MHA's convention, the opposite of SDPA's), or additive float
        → attn_output like query with E features, attn_weights (N, L, S) averaged over heads,
          (N, H, L, S) with average_attn_weights=False, or None with need_weights=False

    ``forward`` follows torch's semantics, including:

    * ``need_weights=True`` (torch's default) returns the weights, computed by torch's own
      forward (a fused kernel never forms them); no warning. Pass ``need_weights=False`` to
      get the fused path.
    * ``is_causal`` is a hint that ``attn_mask`` is the causal mask: it needs ``attn_mask``
      (``RuntimeError`` otherwise), and without ``key_padding_mask`` the mask is then ignored
      and causal attention (top-left aligned) runs instead; with ``key_padding_mask`` the masks
      are used and the hint is ignored.
    * Dropout (``dropout`` of the constructor) only in training mode; ``torch.manual_seed``
      replays it, but the random mask is not the one torch's module would draw.
    * ``add_bias_kv`` / ``add_zero_attn`` append one key/value each (masks are padded with
      "attend"), as torch does.
    * A query row whose keys are all masked returns ``out_proj.bias`` (attention output 0), as
      torch's ``need_weights=False`` path does on CPU (its ``need_weights=True`` path gives NaN).
    * Mixing a bool and a float mask warns (deprecated in torch too); a float mask must have
      the query's dtype.

    Nested-tensor inputs run torch's forward (with one warning).

    Equivalent PyTorch::

        ref = torch.nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, add_bias_kv,
                                          add_zero_attn, kdim, vdim, batch_first)
        ref.load_state_dict(mha.state_dict())
        out, weights = ref(query, key, value, key_padding_mask, need_weights, attn_mask,
                           average_attn_weights, is_causal)
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
                         batch_first, device, dtype)
        self.backend = self._checked_backend(backend)

    @staticmethod
    def _checked_backend(backend: str | None) -> str | None:
        if backend is not None:
            dispatch.forced_backend(backend)  # raises ValueError on an unknown name
        return backend

    def __setstate__(self, state):
        state.setdefault("backend", None)
        super().__setstate__(state)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, backend: str | None = None) -> MultiheadAttention:
        """A drop-in for ``module`` that shares its parameters (the same ``Parameter`` objects and
        the same ``out_proj`` submodule), its configuration and its ``training`` flag: an update
        to either module (optimizer step, ``load_state_dict``) is seen by both.

        Equivalent PyTorch::

            mha = mmkernels.nn.MultiheadAttention(module.embed_dim, module.num_heads, ...)
            mha.load_state_dict(module.state_dict())   # but copying instead of sharing
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch: expected a torch.nn.MultiheadAttention, got {type(module).__name__}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                     "batch_first", "head_dim", "add_zero_attn"):
            setattr(new, name, getattr(module, name))
        for name, p in module._parameters.items():
            new.register_parameter(name, p)
        for name, buf in module._buffers.items():
            new.register_buffer(name, buf, persistent=name not in module._non_persistent_buffers_set)
        for name, child in module._modules.items():
            new.add_module(name, child)
        for name in ("bias_k", "bias_v"):  # plain None attributes when add_bias_kv=False
            if name not in new._parameters:
                setattr(new, name, getattr(module, name))
        new.training = module.training
        new.backend = cls._checked_backend(backend)
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments, shapes and results as :meth:`torch.nn.MultiheadAttention.forward`
        (see the class docstring); ``need_weights=False`` takes the fused path."""
        if need_weights:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            _warn_once("mmkernels.nn.MultiheadAttention: nested-tensor inputs are not supported by the fused "
                       "path; running torch.nn.MultiheadAttention.forward")
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        # checks in torch's order, with torch's exception types
        _check_mask_type(key_padding_mask, "key_padding_mask")
        _check_mask_type(attn_mask, "attn_mask")
        if key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype:
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=3)
        # torch's own shape check (private, present since torch 1.11): same errors as its module
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint replaces the mask (torch passes is_causal=True to SDPA)
        else:
            is_causal = False

        self_attn = query is key and key is value
        kv_same = key is value
        batch_first = self.batch_first or not is_batched
        if not is_batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if batch_first:
            b, lq, e = query.shape
            bk, lk = key.shape[:2]
        else:
            lq, b, e = query.shape
            lk, bk = key.shape[:2]
        h, d = self.num_heads, self.head_dim
        if e != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {e}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        elif key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        if bk != b:
            raise RuntimeError(f"key/value: batch size {bk} differs from query's {b}")
        if attn_mask is not None:
            expected = (lq, lk) if attn_mask.dim() == 2 else (b * h, lq, lk)
            if attn_mask.shape != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, "
                                   f"but should be {expected}.")
        if key_padding_mask is not None:
            if key_padding_mask.shape[0] != b:
                raise AssertionError(f"Expected key_padded_mask.shape[0] to be {b}, "
                                     f"but got {key_padding_mask.shape[0]}")
            if key_padding_mask.shape[1] != lk:
                raise AssertionError(f"Expected key_padded_mask.shape[1] to be {lk}, "
                                     f"but got {key_padding_mask.shape[1]}")
        if (self.bias_k is None) != (self.bias_v is None):
            raise AssertionError("bias_k and bias_v must be both set or both None")
        _check_float_mask_dtype(attn_mask, "attn_mask", query.dtype)
        _check_float_mask_dtype(key_padding_mask, "key_padding_mask", query.dtype)

        # in-projection: (.., .., E) -> (.., .., H, d); one GEMM for self-attention, two for k is v
        w, bias = self.in_proj_weight, self.in_proj_bias
        bq, bk_, bv = bias.chunk(3) if bias is not None else (None, None, None)
        if self._qkv_same_embed_dim and self_attn:
            q, k, v = F.linear(query, w, bias).unflatten(-1, (3, h, d)).unbind(-3)
        elif self._qkv_same_embed_dim and kv_same:
            w_q, w_kv = w.split([e, 2 * e])
            b_kv = bias[e:] if bias is not None else None
            q = F.linear(query, w_q, bq).unflatten(-1, (h, d))
            k, v = F.linear(key, w_kv, b_kv).unflatten(-1, (2, h, d)).unbind(-3)
        else:
            w_q, w_k, w_v = w.chunk(3) if self._qkv_same_embed_dim else (
                self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            q = F.linear(query, w_q, bq).unflatten(-1, (h, d))
            k = F.linear(key, w_k, bk_).unflatten(-1, (h, d))
            v = F.linear(value, w_v, bv).unflatten(-1, (h, d))
        # -> (B, H, L, d) views (last dim contiguous)
        if batch_first:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)

        mask = _sdpa_mask(attn_mask, key_padding_mask, b, h, lq, lk)
        extra = 0
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, h, 1, d).expand(b, h, 1, d)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, h, 1, d).expand(b, h, 1, d)], dim=2)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, h, 1, d)], dim=2)
            v = torch.cat([v, v.new_zeros(b, h, 1, d)], dim=2)
            extra += 1
        if mask is not None and extra:
            # the appended keys are attended by every query (torch pads its masks with 0)
            mask = F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)

        dropout_p = self.dropout if self.training else 0.0
        out = _attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, backend=self.backend)
        if batch_first:
            out = out.transpose(1, 2).reshape(b, lq, e)
        else:
            out = out.permute(2, 0, 1, 3).reshape(lq, b, e)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out if is_batched else out.squeeze(0)
