"""Public functional API; importing registers the ``torch.ops.mmkernels`` ops."""

from .attention import attention
from .attention_scores import attention_scores
from .qformer import qformer_cross_attention
from .token_pool import token_pool

__all__ = ["attention", "attention_scores", "qformer_cross_attention", "token_pool"]
