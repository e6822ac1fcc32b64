"""mmkernels: fused Triton/CUDA kernels for vision-language models.

Importing never touches a GPU, never needs the CUDA extension, never uses the network.
"""

from . import dispatch, nn, ops
from .dispatch import BackendNotSupportedError, use_backend
from .integrations import PatchReport, patch, register_hf, unpatch
from .integrations.prune import FastV, VisionZip
from .ops import attention, attention_scores, qformer_cross_attention, token_pool
from .ops.select_tokens import gather_tokens, restore_tokens, select_tokens

__version__ = "0.1.0"

__all__ = ["BackendNotSupportedError", "FastV", "VisionZip", "attention", "attention_scores", "gather_tokens",
           "restore_tokens", "select_tokens", "dispatch", "nn", "ops", "qformer_cross_attention", "token_pool",
           "use_backend", "__version__",
           "PatchReport", "patch", "register_hf", "unpatch"]
