"""Token-pruning helpers: keep the top-scoring tokens (original order), and apply / undo the same
selection on the tensors that travel with the tokens (position ids, RoPE cos/sin, masks).

Plain PyTorch (``topk`` → ``sort`` → ``gather``): the selection is O(B·L) work next to the
O(L²) attention that produced the scores, and every step compiles with ``torch.compile``.
"""

from __future__ import annotations

import torch

from .._utils import describe

__all__ = ["gather_tokens", "restore_tokens", "select_tokens"]


def _check_index(index: torch.Tensor, batch: int, length: int, name: str = "index") -> None:
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.dtype not in (torch.int64, torch.int32):
        got = describe(index) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"{name}: expected an int64/int32 tensor (B, n), got {got}")
    if index.shape[0] != batch and batch != 1:
        raise ValueError(f"{name}: expected batch {batch}, got {describe(index)}")
    if index.numel() and not torch.compiler.is_compiling():  # a host read: checked eagerly only
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= length:
            raise ValueError(f"{name}: values must lie in [0, {length}), got min {lo}, max {hi} ({describe(index)})")


def _protect_mask(protect, b: int, length: int, device) -> torch.Tensor:
    """``protect`` (None | bool (B, L) or (L,) | int positions (n,) / list) → bool (B, L)."""
    if protect is None:
        return torch.zeros(b, length, dtype=torch.bool, device=device)
    if not isinstance(protect, torch.Tensor):
        protect = torch.as_tensor(list(protect), dtype=torch.int64)
    protect = protect.to(device)
    if protect.dtype == torch.bool:
        if protect.shape not in ((length,), (b, length)):
            raise ValueError(f"protect: a bool mask must be (L,) or (B, L) = {(b, length)}, got {describe(protect)}")
        return protect.expand(b, length)
    if protect.dtype.is_floating_point or protect.dim() != 1:
        raise ValueError(f"protect: expected a bool mask (B, L) / (L,) or int positions (n,), got {describe(protect)}")
    if protect.numel():
        lo, hi = int(protect.min()), int(protect.max())
        if lo < -length or hi >= length:
            raise ValueError(f"protect: positions must lie in [-{length}, {length}), got min {lo}, max {hi}")
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    mask[protect % length] = True
    return mask.expand(b, length)


def select_tokens(hidden_states: torch.Tensor, scores: torch.Tensor, keep, *, protect=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` highest-scoring tokens of each sample, plus the protected ones, in their
    original order.

    ``hidden_states`` (B, L, ...) any dtype; ``scores`` (B, L) real (e.g. from
    :func:`mmkernels.attention_scores`).  ``keep``: an int (how many unprotected tokens to keep,
    0 <= keep <= their count) or a float fraction in (0, 1] of the unprotected tokens
    (``round(keep · n)``, FastV's rounding).  ``protect``: always-kept positions — a bool mask
    (B, L) / (L,), or int positions (n,) (e.g. ``[0]`` for CLS); every sample must protect the
    same number of tokens (the result is rectangular).  Ties break toward the lower position.

    Returns ``(kept, index)``: ``kept`` (B, n_protect + k, ...) = ``hidden_states`` gathered at
    ``index`` (B, n_protect + k) int64, sorted ascending.  Apply the same selection to position
    ids / RoPE tables / masks with :func:`gather_tokens`; undo it with :func:`restore_tokens`.

    Example (L=6, keep=2, protect=[0])::

        scores   [9, 1, 7, 3, 8, 2]   → index [0, 2, 4] (0 protected; 8 and 7 the top two)

    Equivalent PyTorch::

        s = scores.masked_fill(protect_mask, float("inf"))
        index = s.topk(n_protect + k, dim=1).indices.sort(dim=1).values
        kept = hidden_states.gather(1, index[..., None].expand(-1, -1, *hidden_states.shape[2:]))
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        got = describe(hidden_states) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states: expected a tensor (B, L, ...), got {got}")
    b, length = hidden_states.shape[:2]
    if (not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (b, length)
            or not scores.dtype.is_floating_point or scores.device != hidden_states.device):
        got = describe(scores) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores: expected a floating tensor (B, L) = {(b, length)} on {hidden_states.device}, "
                         f"got {got}")
    prot = _protect_mask(protect, b, length, hidden_states.device)
    counts = prot.sum(1)
    n_prot = int(counts[0]) if b else 0
    if b and not bool((counts == n_prot).all()):
        raise ValueError(f"protect: every sample must protect the same number of tokens, got {counts.tolist()}")
    free = length - n_prot
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep: expected an int or a float fraction, got {keep!r}")
    if isinstance(keep, float):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep: a fraction must lie in (0, 1], got {keep}")
        k = int(round(keep * free))
    else:
        k = keep
        if not 0 <= k <= free:
            raise ValueError(f"keep: {k} tokens requested but only {free} of L={length} are unprotected "
                             f"({n_prot} protected)")
    # protected tokens score +inf so top-k always takes them; stable sort of -score breaks ties
    # toward the lower position (torch.topk's tie order is unspecified)
    s = scores.float().masked_fill(prot, float("inf"))
    order = torch.sort(-s, dim=1, stable=True).indices[:, : n_prot + k]
    index = order.sort(dim=1).values
    return gather_tokens(hidden_states, index, 1), index


def gather_tokens(x: torch.Tensor, index: torch.Tensor, dim=1, *, batch_dim: int = 0) -> torch.Tensor:
    """Apply a token selection ``index`` (B, n) to ``x`` along ``dim`` (an int or a tuple of dims,
    e.g. ``(-2, -1)`` for both axes of a (B, 1, L, L) mask).  ``batch_dim``: where ``x`` keeps its
    batch (1 for Qwen2-VL's (3, B, L) position ids); a batch of 1 is broadcast to B (LLaMA's
    (1, L, D) RoPE tables).

    Equivalent PyTorch (dim=1, batch_dim=0): ``x[torch.arange(B)[:, None], index]``.
    """
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a tensor, got {type(x).__name__}")
    nd = x.dim()
    bd = batch_dim % nd if -nd <= batch_dim < nd else None
    if bd is None:
        raise ValueError(f"batch_dim: {batch_dim} is out of range for {describe(x)}")
    b = index.shape[0] if isinstance(index, torch.Tensor) and index.dim() == 2 else -1
    if x.shape[bd] not in (1, b):
        raise ValueError(f"x: batch {x.shape[bd]} (dim {bd}) does not match index batch {b} ({describe(x)})")
    for d in dims:
        if not -nd <= d < nd or d % nd == bd:
            raise ValueError(f"dim: {d} is out of range or the batch dim for {describe(x)}")
        _check_index(index, b, x.shape[d % nd])
    batch = torch.arange(b, device=x.device)[:, None]
    for d in dims:
        xm = x.movedim((bd, d % nd), (0, 1))
        xm = xm.expand(b, *xm.shape[1:])
        x = xm[batch, index.to(x.device)].movedim((0, 1), (bd, d % nd))
    return x


def restore_tokens(kept: torch.Tensor, index: torch.Tensor, length: int, *, fill=0.0) -> torch.Tensor:
    """Inverse of :func:`select_tokens`: (B, length, ...) with ``kept`` (B, n, ...) written back at
    ``index`` (B, n) and ``fill`` elsewhere (e.g. 0 for hidden states, ``False`` for a keep-mask).

    Equivalent PyTorch: ``out = full((B, length, ...), fill); out[arange(B)[:, None], index] = kept``.
    """
    if not isinstance(kept, torch.Tensor) or kept.dim() < 2:
        raise ValueError(f"kept: expected a tensor (B, n, ...), got {type(kept).__name__}")
    if not isinstance(length, int) or length < kept.shape[1]:
        raise ValueError(f"length: expected an int >= n = {kept.shape[1]}, got {length!r}")
    _check_index(index, kept.shape[0], length)
    if tuple(index.shape) != tuple(kept.shape[:2]):
        raise ValueError(f"index: expected shape {tuple(kept.shape[:2])} like kept's (B, n), got {describe(index)}")
    out = torch.full((kept.shape[0], length, *kept.shape[2:]), fill, dtype=kept.dtype, device=kept.device)
    out[torch.arange(kept.shape[0], device=kept.device)[:, None], index.to(kept.device)] = kept
    return out
