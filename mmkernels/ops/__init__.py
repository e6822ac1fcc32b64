"""Public functional API; importing registers the ``torch.ops.mmkernels`` ops."""

from .attention import attention

__all__ = ["attention"]
