"""Drop-in ``nn.Module``s backed by mmkernels ops."""

from .attention import MultiheadAttention
from .qformer import QFormerAttention, QFormerSharedKV
from .token_pool import (
    Gemma3MultiModalProjector,
    Idefics3PixelShuffle,
    InternVLPixelShuffle,
    LlavaNextVideoPooler,
    LlavaOnevisionPooling,
    Qwen2VLPatchMerger,
    RMSNorm,
    TokenPooler,
)

__all__ = ["Gemma3MultiModalProjector", "Idefics3PixelShuffle", "InternVLPixelShuffle", "LlavaNextVideoPooler",
           "LlavaOnevisionPooling", "MultiheadAttention", "QFormerAttention", "QFormerSharedKV", "Qwen2VLPatchMerger",
           "RMSNorm", "TokenPooler"]
