"""mmkernels: fused Triton/CUDA kernels for vision-language models.

Importing never touches a GPU, never needs the CUDA extension, never uses the network.
"""

from . import dispatch, nn, ops
from .dispatch import BackendNotSupportedError, use_backend
from .integrations import PatchReport, patch, register_hf, unpatch
from .ops import attention, attention_varlen, qformer_cross_attention, token_pool

__version__ = "0.1.0"

__all__ = ["BackendNotSupportedError", "attention", "attention_varlen", "dispatch", "nn", "ops",
           "qformer_cross_attention", "token_pool",
           "use_backend", "__version__",
           "PatchReport", "patch", "register_hf", "unpatch"]
