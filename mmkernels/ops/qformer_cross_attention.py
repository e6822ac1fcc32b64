"""``mmkernels.qformer_cross_attention``: the Q-Former's cross-attention with K/V projected
inside the attention kernel (BLIP-2 / InstructBLIP).

Forward: one fused Triton kernel (:mod:`mmkernels.kernels.qformer_cross_attention`) — K and V never reach
memory.  Backward (``mmkernels::qformer_cross_attention_bwd``): Q, K, V are recomputed with
cuBLAS (three GEMMs are cheaper than storing K/V for every layer), the attention backward
kernels give dQ, dK, dV, and the weight/input gradients are plain well-shaped GEMMs:
dW = dYᵀ·X over all B·L rows, db = Σ dY, dX = dY·W.
"""

from __future__ import annotations

import math
from typing import Optional, TypedDict

import torch
import torch.nn.functional as F

from .. import dispatch
from .._utils import (
    broadcasts_to,
    check_dropout_and_scale,
    contiguous_outputs,
    describe,
    empty_contiguous,
    triton_reasons,
)
from ..reference import qformer_cross_attention as ref

__all__ = ["qformer_cross_attention"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Inputs(TypedDict):
    """What every backend receives (``check(inputs)``, ``run(**inputs)``), built once per call by
    :func:`_inputs`: the arguments validated, the scale resolved, a (Lk,) mask as (1, 1, 1, Lk)."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor
    q_weight: torch.Tensor
    q_bias: Optional[torch.Tensor]
    k_weight: torch.Tensor
    k_bias: Optional[torch.Tensor]
    v_weight: torch.Tensor
    v_bias: Optional[torch.Tensor]
    num_heads: int
    encoder_attention_mask: Optional[torch.Tensor]
    dropout_p: float
    scale: float


# --------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------
@torch.library.custom_op("mmkernels::qformer_cross_attention_fwd", mutates_args=())
def _qformer_fwd(
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    num_heads: int,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from ..kernels.qformer_cross_attention import qformer_forward

    return qformer_forward(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                           v_weight, v_bias, attn_mask, seed, num_heads, dropout_p, scale)


@_qformer_fwd.register_fake
def _(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
      attn_mask, seed, num_heads, dropout_p, scale):
    b = max(hidden_states.shape[0], encoder_hidden_states.shape[0])
    lq = hidden_states.shape[1]
    out = hidden_states.new_empty(b, lq, q_weight.shape[0])
    stats = hidden_states.new_empty(b, num_heads, 2, lq, dtype=torch.float32)
    return out, stats


@torch.library.custom_op("mmkernels::qformer_cross_attention_bwd", mutates_args=())
def _qformer_bwd(
    grad_out: torch.Tensor,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    num_heads: int,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    from ..kernels.qformer_cross_attention import qformer_backward

    return contiguous_outputs(*qformer_backward(grad_out, hidden_states, encoder_hidden_states, q_weight, q_bias,
                                                k_weight, k_bias, v_weight, v_bias, attn_mask, seed,
                                                num_heads, dropout_p, scale))


@_qformer_bwd.register_fake
def _(grad_out, hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
      attn_mask, seed, num_heads, dropout_p, scale):
    return tuple(empty_contiguous(t) for t in (hidden_states, encoder_hidden_states, q_weight, q_bias,
                                              k_weight, k_bias, v_weight, v_bias))


def _setup_context(ctx, inputs, output):
    x, enc, wq, bq, wk, bk, wv, bv, mask, seed, num_heads, dropout_p, scale = inputs
    ctx.mark_non_differentiable(output[1])
    # the backward recomputes Q/K/V and the attention forward (see kernels.qformer_cross_attention.qformer_backward):
    # nothing of the fused forward's output is kept
    ctx.save_for_backward(x, enc, wq, bq, wk, bk, wv, bv, mask, seed)
    ctx.num_heads, ctx.dropout_p, ctx.scale = num_heads, dropout_p, scale


def _backward(ctx, grad_out, grad_stats):
    x, enc, wq, bq, wk, bk, wv, bv, mask, seed = ctx.saved_tensors
    grads = _qformer_bwd(grad_out, x, enc, wq, bq, wk, bk, wv, bv, mask, seed,
                         ctx.num_heads, ctx.dropout_p, ctx.scale)
    return (*grads, None, None, None, None, None)


_qformer_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def check_keep_mask_values(mask: torch.Tensor, name: str = "encoder_attention_mask") -> None:
    """A non-bool 2-D (B, Lk) mask is a keep-mask: its values must be 0 (drop) or 1 (keep).  An
    additive mask there (0 = keep, -10000 / finfo.min / -inf = drop) would be read inverted (its
    nonzero columns kept, its 0 columns dropped), so it raises ``ValueError``.  The values are
    read only where that costs no device sync: a CPU tensor, outside ``torch.compile``
    (elsewhere the mask is trusted)."""
    if mask.dtype == torch.bool or mask.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        example = mask[bad][0].item()
        raise ValueError(
            f"{name}: a 2-D mask is a keep-mask (B, Lk) with 1/True = keep and 0/False = drop, got a value "
            f"{example!r} outside {{0, 1}} in {describe(mask)}; pass an additive mask as 4-D (B or 1, H or 1, "
            f"Lq or 1, Lk), e.g. mask[:, None, None, :]"
        )


def _validate(x, enc, wq, bq, wk, bk, wv, bv, num_heads, mask, dropout_p, scale) -> None:
    named = (("hidden_states", x), ("encoder_hidden_states", enc), ("q_weight", wq), ("k_weight", wk),
             ("v_weight", wv), ("q_bias", bq), ("k_bias", bk), ("v_bias", bv))
    for name, t in named:
        if t is None and name.endswith("_bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a floating dtype, got {describe(t)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name}: expected dtype {x.dtype} on {x.device} like hidden_states, got {describe(t)}")
    if x.dim() != 3:
        raise ValueError(f"hidden_states: expected (B, Lq, Dq), got {describe(x)}")
    if enc.dim() != 3:
        raise ValueError(f"encoder_hidden_states: expected (B, Lk, Dkv), got {describe(enc)}")
    if x.shape[0] != enc.shape[0] and 1 not in (x.shape[0], enc.shape[0]):
        raise ValueError(
            f"encoder_hidden_states: batch must equal hidden_states' batch {x.shape[0]} or be 1, got {describe(enc)}"
        )
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads: expected a positive int, got {num_heads!r}")
    if wq.dim() != 2 or wq.shape[1] != x.shape[2]:
        raise ValueError(f"q_weight: expected (A, Dq) with Dq = hidden_states' width {x.shape[2]}, got {describe(wq)}")
    a = wq.shape[0]
    if a % num_heads != 0:
        raise ValueError(f"num_heads: {num_heads} does not divide the attention width {a} (q_weight {describe(wq)})")
    for name, w in (("k_weight", wk), ("v_weight", wv)):
        if w.dim() != 2 or w.shape[0] != a or w.shape[1] != enc.shape[2]:
            raise ValueError(
                f"{name}: expected (A, Dkv) = ({a}, {enc.shape[2]}) matching q_weight's rows and "
                f"encoder_hidden_states' width, got {describe(w)}"
            )
    for name, bias in (("q_bias", bq), ("k_bias", bk), ("v_bias", bv)):
        if bias is not None and tuple(bias.shape) != (a,):
            raise ValueError(f"{name}: expected shape ({a},), got {describe(bias)}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(f"encoder_attention_mask: expected a tensor or None, got {type(mask).__name__}")
        if mask.device != x.device:
            raise ValueError(f"encoder_attention_mask: expected device {x.device}, got {describe(mask)}")
        b, lq, lk = max(x.shape[0], enc.shape[0]), x.shape[1], enc.shape[1]
        if mask.dim() == 2:
            ok = mask.shape[1] == lk and mask.shape[0] in (1, b)
            if ok:
                check_keep_mask_values(mask)
        else:
            if mask.dtype != torch.bool and mask.dtype != x.dtype:
                raise ValueError(
                    f"encoder_attention_mask: a 3-D/4-D mask must be bool or additive {x.dtype}, got {describe(mask)}"
                )
            ok = broadcasts_to(mask, (b, num_heads, lq, lk))
        if not ok:
            raise ValueError(
                f"encoder_attention_mask: expected (B, Lk) = ({b}, {lk}) or a mask broadcastable to "
                f"(B, H, Lq, Lk) = ({b}, {num_heads}, {lq}, {lk}), got {describe(mask)}"
            )
    check_dropout_and_scale(dropout_p, scale)


def _inputs(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, num_heads,
            encoder_attention_mask, dropout_p, scale) -> Inputs:
    """The call validated (:func:`_validate`) and made the record every backend receives."""
    _validate(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
              num_heads, encoder_attention_mask, dropout_p, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q_weight.shape[0] // num_heads)
    if encoder_attention_mask is not None and encoder_attention_mask.dim() == 1:
        # an SDPA mask over the keys (Lk,): the 4-D view every backend takes (SDPA fails on 1-D)
        encoder_attention_mask = encoder_attention_mask.view(1, 1, 1, -1)
    return Inputs(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, q_weight=q_weight,
                  q_bias=q_bias, k_weight=k_weight, k_bias=k_bias, v_weight=v_weight, v_bias=v_bias,
                  num_heads=num_heads, encoder_attention_mask=encoder_attention_mask, dropout_p=float(dropout_p),
                  scale=float(scale))


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _triton_check(inp: Inputs) -> list:
    x, mask = inp["hidden_states"], inp["encoder_attention_mask"]
    reasons = triton_reasons(x, head_dim=inp["q_weight"].shape[0] // inp["num_heads"], max_head_dim=128,
                             nonempty=(x, inp["encoder_hidden_states"]))
    if mask is not None and mask.dtype != torch.bool and mask.requires_grad:
        reasons.append("a float encoder_attention_mask that requires grad (mask gradients are not computed)")
    return reasons


def _zeros_if_none(bias, like):
    return torch.zeros(like.shape[0], dtype=like.dtype, device=like.device) if bias is None else bias


# Which Triton path runs (``triton_path``): "fused" projects K/V inside the attention kernel
# (never written to memory); "hoisted" projects Q, K and V for all heads with three cuBLAS GEMMs
# and runs the attention kernels on them.  The fused kernel re-reads each head's weight slice per
# key tile and the image features per head: counted for BLIP-2 at B=64 (32×257, 12×64 heads,
# Dkv=1408) it issues 93 GFLOP against 75 and moves ~2 GB from L2, an estimated ~2× slower than
# hoisting, while at small batches one launch instead of four and no K/V round trip should win.
# Rule (an estimate until a GPU benchmark sets it): hoisted when the batch is >= HOIST_MIN_BATCH.
HOIST_MIN_BATCH = 8


def triton_path(batch: int) -> str:
    """The Triton path the dispatcher takes for a Q-Former batch: "fused" or "hoisted".

    ``HOIST_MIN_BATCH`` (module attribute) sets the rule; a benchmark overrules it by assigning
    it (0: always hoisted; a huge value: always fused)."""
    return "hoisted" if batch >= HOIST_MIN_BATCH else "fused"


# Shared K/V (a patched BLIP-2 / InstructBLIP Q-Former, :class:`mmkernels.nn.QFormerSharedKV`): the
# cross-attention layers all read the same image features, so K and V of every layer can come from
# ONE GEMM over the concatenated weights [n_layers·2·A, Dkv] per Q-Former forward (BLIP-2: 6 layers,
# one 9216×1408 GEMM instead of twelve 768×1408 ones), each layer then running its own Q projection
# and the attention kernel on views of that product.  Rule (``shares_kv``):
# * Triton route: share wherever the per-layer call would be the hoisted path (which projects K/V
#   with its own GEMMs per layer), keep the fused kernel (K/V never in memory) below the batch
#   ``SHARED_KV_MIN_BATCH`` (None = ``HOIST_MIN_BATCH``).  Why one GEMM should win on a GPU
#   (an estimate): at B=8 each per-layer GEMM is 2056×768, 16×6 = 96 tiles of 128×128 for 132 SMs,
#   where the shared one has 16×72 = 1152; the image features are read once, not 12 times; one
#   launch instead of 12, and likewise for dW and dX in the backward.
# * SDPA / reference routes: share on a GPU (same reasons); on a CPU only with
#   ``SHARED_KV_ON_CPU``: measured here (1 thread, BLIP-2 widths, B=4 × 257): one 9216×1408 GEMM is
#   no faster than twelve 768×1408 (523–573 vs 511–541 ms; 158 vs 146 ms at B=1) and the weight
#   concatenation and the split's backward copy make fwd+bwd of the projections 2–11 % slower
#   (1936–1995 vs 1792–1892 ms).
# Both thresholds are estimates a GPU benchmark overrules by assigning them
# (``mmkernels bench qformer_model`` times fused, hoisted and shared side by side).
SHARED_KV_MIN_BATCH: int | None = None
SHARED_KV_ON_CPU = False


def route(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, num_heads,
          encoder_attention_mask=None, dropout_p=0.0, scale=None, *, backend=None) -> str:
    """The backend :func:`qformer_cross_attention` would run these arguments on ("triton", "sdpa",
    "reference"), without running, recording or warning.  Raises as the op would (ValueError for bad
    input, :class:`mmkernels.dispatch.BackendNotSupportedError` when no backend / the forced one
    cannot run it)."""
    inputs = _inputs(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                     num_heads, encoder_attention_mask, dropout_p, scale)
    forced = dispatch.forced_backend(backend)
    rejected = []
    for b in dispatch.backends("qformer_cross_attention"):
        if forced is not None and b.name != forced:
            continue
        reasons = b.not_supported_reasons(inputs)
        if not reasons:
            return b.name
        rejected.append(f"{b.name}: " + ", ".join(r.text for r in reasons))
    raise dispatch.BackendNotSupportedError(
        f"mmkernels.qformer_cross_attention: no backend can run this call ({'; '.join(rejected) or forced})")


def shares_kv(backend: str, batch: int, device: torch.device | str | None = None) -> bool:
    """Whether a patched Q-Former projects K/V of all its cross-attention layers in one GEMM when
    the per-layer :func:`qformer_cross_attention` would run on ``backend`` (see :func:`route`) at this
    ``batch`` on ``device``: on the Triton route from ``SHARED_KV_MIN_BATCH`` (default
    ``HOIST_MIN_BATCH``) on, i.e. unless the fused kernel would run (on CPU tensors that route exists
    only in the interpreter, which stands for a GPU); on SDPA / the reference, on a GPU always, on a
    CPU when ``SHARED_KV_ON_CPU`` (default off: no gain measured there).  See the comment above."""
    if backend == "triton":
        threshold = HOIST_MIN_BATCH if SHARED_KV_MIN_BATCH is None else SHARED_KV_MIN_BATCH
        return batch >= threshold
    if device is not None and torch.device(device).type == "cpu":
        return SHARED_KV_ON_CPU
    return True


def _hoisted(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
             num_heads, mask, seed, dropout_p, scale):
    """cuBLAS projections for all heads, then the Triton attention op (autograd through both)."""
    from ..kernels.qformer_cross_attention import project_heads
    from .attention import _attention_fwd

    q, k, v = project_heads(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                            v_weight, v_bias, num_heads)
    out, _ = _attention_fwd(q, k, v, mask, seed, float(dropout_p), False, float(scale))
    return out.transpose(1, 2).flatten(2)


def _triton_run(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                num_heads, encoder_attention_mask, dropout_p, scale):
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=hidden_states.device)
    mask = normalize_encoder_mask(encoder_attention_mask, hidden_states.dtype)
    if triton_path(max(hidden_states.shape[0], encoder_hidden_states.shape[0])) == "hoisted":
        return _hoisted(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                        num_heads, mask, seed, dropout_p, scale)
    out, _ = _qformer_fwd(hidden_states, encoder_hidden_states, q_weight, _zeros_if_none(q_bias, q_weight),
                          k_weight, _zeros_if_none(k_bias, k_weight), v_weight, _zeros_if_none(v_bias, v_weight),
                          mask, seed, num_heads, float(dropout_p), float(scale))
    return out


def normalize_encoder_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The op's mask forms as an SDPA mask broadcastable to (B, H, Lq, Lk): a (B, Lk) padding
    mask (1/True = keep, HF's ``encoder_attention_mask``) becomes bool (B, 1, 1, Lk); 3-D/4-D
    masks keep SDPA semantics (bool True = attend, float additive, cast to ``dtype``)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return (mask if mask.dtype == torch.bool else mask != 0).view(mask.shape[0], 1, 1, mask.shape[1])
    return mask if mask.dtype == torch.bool else mask.to(dtype)


def _sdpa_check(inp: Inputs) -> list:
    if inp["encoder_hidden_states"].shape[1] == 0:
        return ["no image tokens (Lk = 0): SDPA gives NaN where mmkernels gives 0"]
    return []


def _sdpa_run(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
              num_heads, encoder_attention_mask, dropout_p, scale):
    from ..kernels.qformer_cross_attention import project_heads

    q, k, v = project_heads(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias,
                            v_weight, v_bias, num_heads)
    mask = normalize_encoder_mask(encoder_attention_mask, hidden_states.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2).flatten(2)


def _reference_run(**inp):
    return ref.qformer_cross_attention(**inp)


dispatch.register(dispatch.Backend("triton", "qformer_cross_attention", _triton_check, _triton_run,
                                   description="fused Triton: K/V projected inside the attention kernel"))
dispatch.register(dispatch.Backend("sdpa", "qformer_cross_attention", _sdpa_check, _sdpa_run,
                                   description="cuBLAS projections + torch SDPA"))
dispatch.register(dispatch.Backend("reference", "qformer_cross_attention", lambda inp: [], _reference_run,
                                   description="plain PyTorch (mmkernels.reference.qformer_cross_attention)"))


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def qformer_cross_attention(
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor | None,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    num_heads: int,
    encoder_attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Q-Former cross-attention context, fused: K/V are projected inside the attention kernel.

    Shapes: ``hidden_states`` (B, Lq, Dq) — the learned queries (32 in BLIP-2; 32 + text in
    InstructBLIP); ``encoder_hidden_states`` (B, Lk, Dkv) — image features (EVA ViT-g: 257 ×
    1408); a batch of 1 on either side broadcasts over the other (as HF's matmuls do).
    ``q_weight`` (A, Dq), ``k_weight``/``v_weight`` (A, Dkv), biases (A,) or None; A = H·d
    (768 = 12·64 in BLIP-2).  Returns (B, Lq, A): the heads merged, before the output dense.

    ``encoder_attention_mask``: (B, Lk) with 1/True = keep (an image padding mask), or any
    SDPA mask broadcastable to (B, H, Lq, Lk) (bool True = attend, or additive float such as
    HF's extended (B, 1, 1, Lk) mask).  A 2-D mask is always a keep-mask: values other than
    0 / 1 (an additive mask such as 0 / -10000) raise ``ValueError`` — pass additive masks 4-D.
    That value check reads the mask only where it costs no device sync (a CPU tensor, outside
    ``torch.compile``); a CUDA mask or a compiled call is trusted.  ``scale`` defaults to
    d^-½.  ``dropout_p`` drops attention probabilities in-kernel (Philox, seeded from torch's
    generator).  Rows with no visible key return 0.

    Equivalent PyTorch (HF ``Blip2QFormerMultiHeadAttention`` in cross-attention mode)::

        q = F.linear(hidden_states, q_weight, q_bias).view(B, Lq, H, d).transpose(1, 2)
        k = F.linear(encoder_hidden_states, k_weight, k_bias).view(B, Lk, H, d).transpose(1, 2)
        v = F.linear(encoder_hidden_states, v_weight, v_bias).view(B, Lk, H, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, scale=scale)
        out.transpose(1, 2).reshape(B, Lq, H * d)
    """
    inputs = _inputs(hidden_states, encoder_hidden_states, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias,
                     num_heads, encoder_attention_mask, dropout_p, scale)
    return dispatch.select("qformer_cross_attention", inputs, backend).run(**inputs)
