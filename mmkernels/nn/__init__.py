"""Drop-in ``nn.Module``s backed by mmkernels ops."""

from .attention import MultiheadAttention

__all__ = ["MultiheadAttention"]
