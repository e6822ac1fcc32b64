"""Public functional API; importing registers the ``torch.ops.mmkernels`` ops."""

from .attention import attention
from .qformer import qformer_cross_attention

__all__ = ["attention", "qformer_cross_attention"]
