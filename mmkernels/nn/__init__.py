"""Drop-in ``nn.Module``s backed by mmkernels ops."""

from .attention import MultiheadAttention
from .qformer import QFormerAttention

__all__ = ["MultiheadAttention", "QFormerAttention"]
