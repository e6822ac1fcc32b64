"""Sequence-parallel packed attention (DeepSpeed-Ulysses style) on ``torch.distributed``.

:func:`ulysses_attention_varlen` runs :func:`mmkernels.attention_varlen` over a packing whose
tokens are sharded across the ranks of a process group (one long video: 30k–60k tokens in a
Qwen3-VL video tower).  Each rank holds a contiguous slice of the packed token dimension and all
heads; one all-to-all turns that into all tokens and a slice of the heads, attention runs locally
with the *global* ``cu_seqlens`` (sequences may straddle rank boundaries: every rank sees every
token of its heads), and a second all-to-all returns the rank's tokens with all heads.  The
backward is the same exchange reversed.

Collectives: ``torch.distributed.all_to_all_single`` only (with per-rank split sizes, so uneven
shards work), wrapped in a ``torch.autograd.Function`` whose backward is the inverse
all-to-all.  Gloo (CPU) and NCCL (CUDA) both implement it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .ops.attention_varlen import attention_varlen

__all__ = ["ulysses_attention_varlen"]


# --------------------------------------------------------------------------------------
# the all-to-all, differentiable
# --------------------------------------------------------------------------------------
def _scatter_heads(x: torch.Tensor, group, world: int, shard_sizes: Sequence[int]) -> torch.Tensor:
    """(T_r, H, D) on rank r → (T, H/P, D): every rank's tokens (in rank order), this rank's heads."""
    t_loc, h, d = x.shape
    hp = h // world
    send = x.reshape(t_loc, world, hp, d).transpose(0, 1).reshape(world * t_loc, hp, d)  # a copy
    out = x.new_empty(sum(shard_sizes), hp, d)
    dist.all_to_all_single(out, send, output_split_sizes=list(shard_sizes),
                           input_split_sizes=[t_loc] * world, group=group)
    return out


def _gather_heads(y: torch.Tensor, group, world: int, shard_sizes: Sequence[int], rank: int) -> torch.Tensor:
    """(T, H/P, D) → (T_r, H, D): this rank's tokens, every rank's heads (in rank order)."""
    _, hp, d = y.shape
    t_loc = shard_sizes[rank]
    out = y.new_empty(world * t_loc, hp, d)
    dist.all_to_all_single(out, y.contiguous(), output_split_sizes=[t_loc] * world,
                           input_split_sizes=list(shard_sizes), group=group)
    return out.reshape(world, t_loc, hp, d).transpose(0, 1).reshape(t_loc, world * hp, d)


class _HeadAllToAll(torch.autograd.Function):
    """``scatter=True``: tokens-sharded → heads-sharded; ``scatter=False``: the inverse.  The
    backward of one is the other."""

    @staticmethod
    def forward(ctx, x, group, world, rank, shard_sizes, scatter):
        ctx.group, ctx.world, ctx.rank, ctx.shard_sizes, ctx.scatter = group, world, rank, shard_sizes, scatter
        if scatter:
            return _scatter_heads(x, group, world, shard_sizes)
        return _gather_heads(x, group, world, shard_sizes, rank)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.scatter:
            g = _gather_heads(grad, ctx.group, ctx.world, ctx.shard_sizes, ctx.rank)
        else:
            g = _scatter_heads(grad, ctx.group, ctx.world, ctx.shard_sizes)
        return g, None, None, None, None, None


# --------------------------------------------------------------------------------------
# validation (host shapes and ints only: no device read, no collective)
# --------------------------------------------------------------------------------------
def _shards(name: str, sizes, local: int, world: int, rank: int, tensor_name: str) -> tuple[int, ...]:
    if sizes is None:
        return (local,) * world
    if isinstance(sizes, torch.Tensor) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        raise ValueError(f"{name}: expected a sequence of {world} Python ints (host values: a tensor would "
                         f"need a device read), got {sizes!r}")
    sizes = tuple(sizes)
    if len(sizes) != world:
        raise ValueError(f"{name}: expected one size per rank ({world} ranks), got {len(sizes)}: {sizes}")
    if any(s < 0 for s in sizes):
        raise ValueError(f"{name}: sizes must be >= 0, got {sizes}")
    if sizes[rank] != local:
        raise ValueError(f"{name}: rank {rank}'s entry is {sizes[rank]} but its {tensor_name} shard has "
                         f"{local} tokens")
    return sizes


def _validate(query, key, value, world: int, rank: int, shard_sizes, shard_sizes_k, dropout_p, enable_gqa,
              rotary):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected this rank's shard of the packing, (T_local, H, D), got {got}")
    if key.shape[0] != value.shape[0] or key.shape[1] != value.shape[1]:
        raise ValueError(f"key/value: expected the same (T_local, Hkv) shard, got key {tuple(key.shape)} and "
                         f"value {tuple(value.shape)}")
    hq, hkv = query.shape[1], key.shape[1]
    if hq % world:
        raise ValueError(f"query: {hq} heads do not split over {world} sequence-parallel ranks (the all-to-all "
                         f"gives each rank H/P heads; query shard {tuple(query.shape)})")
    if hkv % world:
        raise ValueError(f"key/value: {hkv} kv heads do not split over {world} sequence-parallel ranks (GQA "
                         f"kv heads must divide by P too; key shard {tuple(key.shape)}); repeat the kv heads "
                         f"to a multiple of {world} first")
    if hkv != hq and (not enable_gqa or hq % hkv):
        raise ValueError(f"key: {hkv} kv heads for {hq} query heads needs enable_gqa=True and Hq % Hkv == 0")
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: not supported under sequence parallelism (each rank would draw "
                         f"its own seed and index the Philox mask by its local heads, so the result would not "
                         f"match a single-rank run); apply dropout outside or use dropout_p=0")
    sizes_q = _shards("shard_sizes", shard_sizes, query.shape[0], world, rank, "query")
    if shard_sizes_k is None and shard_sizes is not None and key.shape[0] == query.shape[0]:
        shard_sizes_k = sizes_q
    sizes_k = _shards("shard_sizes_k", shard_sizes_k, key.shape[0], world, rank, "key")
    if rotary is not None:
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise ValueError(f"rotary: expected a (cos, sin) pair of tensors, got {type(rotary).__name__}")
        total = sum(sizes_q)
        for name, t in zip(("rotary cos", "rotary sin"), rotary):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] != total:
                raise ValueError(f"{name}: expected the GLOBAL table, ({total}, D) or ({total}, D/2) rows for "
                                 f"all {total} packed tokens (every rank attends over all tokens of its heads), "
                                 f"got shape {tuple(t.shape)}; this rank's shard is {tuple(query.shape)}")
    return sizes_q, sizes_k


# --------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------
def ulysses_attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    shard_sizes: Optional[Sequence[int]] = None,
    shard_sizes_k: Optional[Sequence[int]] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Sequence-parallel :func:`mmkernels.attention_varlen` (DeepSpeed-Ulysses all-to-all over heads).

    The packing is global: ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32, (n+1,), identical on every
    rank) describe all T tokens, and rank r of ``group`` (P ranks; default the world) holds the
    contiguous token slice ``[sum(shard_sizes[:r]), sum(shard_sizes[:r+1]))`` with all heads:
    ``query`` (T_r, Hq, D), ``key`` (T_r^k, Hkv, D), ``value`` (T_r^k, Hkv, Dv) → (T_r, Hq, Dv), the
    rows of ``attention_varlen(Q, K, V, cu_seqlens_q, cu_seqlens_k, ...)`` over the concatenated
    shards that this rank holds.  Sequences may straddle rank boundaries.  Differentiable end to
    end (gradients land on this rank's shards); every rank must call it (collectives).

    Shards: by default equal, ``T = P·T_r`` (``shard_sizes=None``: each rank's own length, assumed
    the same on every rank — not checked across ranks, which would need a collective; a mismatch
    surfaces as an all-to-all size error or as ``attention_varlen``'s cu_seqlens/total check).
    Uneven shards: pass ``shard_sizes`` (P host ints, the same on every rank; entry r must be this
    rank's T_r), and ``shard_sizes_k`` when the key packing differs from the query's (it defaults
    to ``shard_sizes`` when the local key and query lengths agree, else to equal shards).

    Heads: Hq and Hkv must both be divisible by P (rank r gets query heads
    ``[r·Hq/P, (r+1)·Hq/P)`` and kv heads ``[r·Hkv/P, (r+1)·Hkv/P)``, which keeps every GQA group
    on one rank); otherwise ``ValueError`` naming the shapes.

    Keywords passed through to :func:`mmkernels.attention_varlen`: ``is_causal`` (bottom-right per
    *global* sequence), ``scale``, ``enable_gqa``, ``backend``.  ``rotary=(cos, sin)`` is the
    GLOBAL table, (T, D) or (T, D/2), indexed by the global packed row: after the all-to-all every
    rank holds all T rows (of its heads), and cos/sin do not depend on the head, so the table is
    used unsliced (replicated, T·D per rank; or apply the rotary to the local shards before the
    call and pass ``rotary=None``).  ``dropout_p > 0`` is refused: ranks would not reproduce the
    single-rank mask.  Nothing reads a device value on the host (no ``.item()``/``.tolist()``);
    split sizes are host ints from shapes and ``shard_sizes``.

    Memory per rank (elements; T global tokens, P ranks, B = element size):

    * shards in / out: T/P·(Hq·D + Hkv·(D + Dv) + Hq·Dv);
    * all-to-all: each exchange packs a send copy the size of its input and receives a tensor of
      the same element count (T/P·H·D = T·(H/P)·D), so the head-sharded q/k/v/out — T·(Hq·D +
      Hkv·(D + Dv) + Hq·Dv)/P — are what autograd keeps for the backward, plus the fp32 log-sum-exp
      (Hq/P, 2, T); send buffers are transient (one exchange at a time);
    * the attention itself is the flash-style kernel: no T×T score matrix, so nothing grows as T²
      and no rank ever holds a full (T, H, D) activation; ``cu_seqlens`` (n+1 int32) and a
      ``rotary`` table (T·D, replicated) are the only per-rank terms not divided by P.

    In short O(T·H·D/P) per rank, forward and backward; traffic per exchange is (P−1)/P of the
    local shard, 4 all-to-alls forward (q, k, v, out) and 4 backward (their gradients).

    Equivalent single-process call (``cat`` over ranks in rank order)::

        out_full = mk.attention_varlen(cat(q_shards), cat(k_shards), cat(v_shards), cu_q, cu_k, ...)
        out_r = out_full[sum(shard_sizes[:r]):sum(shard_sizes[:r + 1])]
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ulysses_attention_varlen: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or pass a group)")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    sizes_q, sizes_k = _validate(query, key, value, world, rank, shard_sizes, shard_sizes_k, dropout_p,
                                 enable_gqa, rotary)
    kwargs = dict(dropout_p=0.0, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, rotary=rotary,
                  backend=backend)
    if world == 1:
        return attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                **kwargs)
    q = _HeadAllToAll.apply(query, group, world, rank, sizes_q, True)
    k = _HeadAllToAll.apply(key, group, world, rank, sizes_k, True)
    v = _HeadAllToAll.apply(value, group, world, rank, sizes_k, True)
    out = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
    return _HeadAllToAll.apply(out, group, world, rank, sizes_q, False)
