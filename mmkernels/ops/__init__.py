"""Public functional API; importing registers the ``torch.ops.mmkernels`` ops."""

from .attention import attention
from .attention_scores import attention_scores
from .attention_varlen import attention_varlen
from .qformer_cross_attention import qformer_cross_attention
from .token_pool import token_pool

__all__ = ["attention", "attention_scores", "attention_varlen", "qformer_cross_attention", "token_pool"]
