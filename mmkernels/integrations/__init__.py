"""Integrations: ``patch(model)`` for Hugging Face transformers and ``nn.MultiheadAttention``,
and the HF attention-interface registration (``attn_implementation="mmkernels"``)."""

from .hf import register_hf
from .patch import PatchReport, WeightlessMultiheadAttention, is_patched, patch, unpatch

__all__ = ["PatchReport", "WeightlessMultiheadAttention", "is_patched", "patch", "register_hf", "unpatch"]
