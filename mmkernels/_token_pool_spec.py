"""The validated form of one ``token_pool`` call, shared by the op layer and every backend
(outside ``kernels/`` so that importing mmkernels imports no kernel module).

Pure Python (no triton import): ``mmkernels.ops.token_pool`` builds it at validation time,
before any kernel module is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["MODES", "NORMS", "TokenPoolSpec"]

MODES = ("avg", "max", "bilinear", "merge")
NORMS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class TokenPoolSpec:
    """One validated, fully defaulted ``token_pool`` call (plain Python values only): what
    ``mmkernels.ops.token_pool.make_spec`` returns and every backend (Triton, CUDA, reference) reads.

    Input x: (B, N, C) with N = h·w + has_cls, token t = 1·has_cls + i·w + j for grid cell (i, j).
    Output: (B, keep_cls + oh·ow, C_out) with C_out = kh·kw·C for ``merge``, C otherwise.

    * ``avg`` / ``max``: window (kh, kw), stride (sh, sw), no padding, floor mode:
      oh = (h - kh) // sh + 1, ow = (w - kw) // sw + 1.
    * ``bilinear``: align_corners=False to (oh, ow); kh = kw = sh = sw = 1 (unused).
    * ``merge``: space-to-depth by (kh, kw) (usually s × s), sh = kh, sw = kw, oh = h / kh,
      ow = w / kw; output channel (di·kw + dj)·C + c holds input cell (oi·kh + di, oj·kw + dj),
      channel c.
    * ``norm``: None, "layernorm" (mean/var, then ·weight + bias) or "rmsnorm"
      (x·rsqrt(mean(x²) + eps)·weight (+ bias)), over the C_out channels of every output row,
      computed in fp32; weight/bias (shape (C_out,), optional) are passed beside the spec.
    * ``keep_cls``: output row 0 is input token 0, unpooled (normed like every row);
      only with has_cls, never with ``merge`` (widths differ).
    """

    h: int
    w: int
    mode: str
    kh: int
    kw: int
    sh: int
    sw: int
    oh: int
    ow: int
    has_cls: bool = False
    keep_cls: bool = False
    norm: Optional[str] = None
    eps: float = 1e-6

    @property
    def n_in(self) -> int:
        """Input tokens N (grid plus CLS)."""
        return self.h * self.w + int(self.has_cls)

    @property
    def n_pooled(self) -> int:
        """Pooled grid tokens oh·ow (no CLS)."""
        return self.oh * self.ow

    @property
    def n_out(self) -> int:
        """Output rows: keep_cls + oh·ow."""
        return self.n_pooled + int(self.keep_cls)

    def c_out(self, c: int) -> int:
        """Output width for input width ``c``."""
        return self.kh * self.kw * c if self.mode == "merge" else c

    def index_dtype(self) -> torch.dtype:
        """dtype of the saved max-pool argmax (offset inside the window, row-major)."""
        return torch.int16 if self.kh * self.kw <= 32767 else torch.int32
