"""Public functional API; importing registers the ``torch.ops.mmkernels`` ops."""

from __future__ import annotations

import torch

from . import attention_fp8  # noqa: F401  (registers mmkernels::attention_fp8_fwd, attention_varlen_fp8_fwd)
from .attention import attention
from .attention_scores import attention_scores
from .attention_varlen import attention_varlen
from .qformer_cross_attention import qformer_cross_attention
from .token_pool import token_pool

__all__ = ["SAC_SAVE_LIST", "attention", "attention_scores", "attention_varlen", "qformer_cross_attention",
           "sac_policy", "token_pool"]

# The forward ops whose outputs (attention output + log-sum-exp) selective activation checkpointing
# should keep: add them to a torchtitan-style ``_save_list`` (``save_list | SAC_SAVE_LIST``), or use
# :func:`sac_policy`.  A policy that does not name them recomputes every attention kernel in the
# backward (the default for ops it does not know), the most expensive op of the layer.
SAC_SAVE_LIST = frozenset({
    torch.ops.mmkernels.attention_fwd.default,
    torch.ops.mmkernels.attention_varlen_fwd.default,
    torch.ops.mmkernels.qformer_cross_attention_fwd.default,
})


def sac_policy(save=SAC_SAVE_LIST, *, also_save=()):
    """A ``CheckpointPolicy`` function for ``torch.utils.checkpoint.create_selective_checkpoint_contexts``:
    ``MUST_SAVE`` for the ops in ``save`` (default :data:`SAC_SAVE_LIST`) and ``also_save`` (e.g.
    ``torch.ops.aten.mm.default``), ``PREFER_RECOMPUTE`` for every other op.

    Usage (non-reentrant checkpoint; also what torch.compile's partitioner reads)::

        from functools import partial
        from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
        context_fn = partial(create_selective_checkpoint_contexts, mk.ops.sac_policy())
        out = checkpoint(block, x, use_reentrant=False, context_fn=context_fn)

    With it the attention forward kernel runs once per layer per step; without (plain
    checkpointing) it runs again in the backward's recompute.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    keep = frozenset(save) | frozenset(also_save)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy
