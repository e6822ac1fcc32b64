"""Benchmark cases of ``mmkernels.qformer_cross_attention``: the BLIP-2 / InstructBLIP Q-Former's
cross-attention (Q = Linear(queries), K, V = Linear(image features), attention, heads merged).

Backends:

==========  ===================================================================================
``eager``   HF ``Blip2QFormerMultiHeadAttention``'s eager chain: three ``F.linear``, matmul,
            softmax, matmul (K and V go through memory)
``sdpa``    the same projections + ``F.scaled_dot_product_attention`` (HF's sdpa path); also
            pinned to each SDPA backend: ``sdpa-flash``, ``-efficient``, ``-cudnn``, ``-math``
``mk-attention``  the same projections + ``mmkernels.attention`` (Triton, unfused)
``triton``  ``mmkernels.qformer_cross_attention`` forced to its fused Triton kernel (K/V projected
            in-kernel, never written to memory)
==========  ===================================================================================

Runs in float32 by default, as HF keeps the Q-Former (``--dtype`` overrides). Skipped, with the
reason, when ``mmkernels.qformer_cross_attention`` is not in the build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..reference.qformer import merge_heads, project_heads
from . import flops as fl
from .registry import BenchBackend, Bound, MkBackend, OpBench, ShapeSpec, parse_kv

__all__ = ["BENCH", "QFormerShape", "hf_eager"]


@dataclass(frozen=True)
class QFormerShape:
    """``B`` × ``Lq`` queries of width ``Dq`` attending to ``B`` × ``Lk`` image features of width
    ``Dk`` with ``H`` heads (head dim Dq / H)."""

    B: int
    Lq: int
    Lk: int
    Dq: int
    Dk: int
    H: int


_NO_QFORMER = "{} has no Q-Former (an MLP projector / pooling connects its vision tower to the LLM)"
_BLIP = dict(Lq=32, Lk=257, Dq=768, Dk=1408, H=12)  # EVA ViT-g/14: 257 tokens of 1408; Q-Former 768 = 12 x 64
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "blip2": [
        ShapeSpec("blip2", "cross-b32", "BLIP-2 Q-Former cross-attn, batch 32 (fp32, as HF keeps it)",
                  QFormerShape(B=32, **_BLIP), "float32"),
        ShapeSpec("blip2", "cross-b64", "BLIP-2 Q-Former cross-attn, batch 64 (fp32)",
                  QFormerShape(B=64, **_BLIP), "float32"),
        ShapeSpec("blip2", "cross-b256", "BLIP-2 Q-Former cross-attn, batch 256 (training-size batch, fp32)",
                  QFormerShape(B=256, **_BLIP), "float32"),
    ],
    "instructblip": [
        ShapeSpec("instructblip", "cross-b32", "InstructBLIP Q-Former cross-attn (the 32 queries; the "
                  "instruction tokens skip cross-attn), batch 32, fp32", QFormerShape(B=32, **_BLIP), "float32"),
    ],
    "llava15": _NO_QFORMER.format("LLaVA-1.5"),
    "llava-ov": _NO_QFORMER.format("LLaVA-OneVision"),
    "gemma3": _NO_QFORMER.format("Gemma 3"),
    "qwen2vl": _NO_QFORMER.format("Qwen2-VL"),
    "internvl": _NO_QFORMER.format("InternVL"),
}


def hf_eager(hidden, enc, qw, qb, kw, kb, vw, vb, num_heads: int):
    """HF's eager Q-Former cross-attention (before the output dense), K and V materialised."""
    q, k, v = project_heads(hidden, enc, qw, qb, kw, kb, vw, vb, num_heads)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return merge_heads(torch.matmul(scores.softmax(dim=-1), v))


def hf_sdpa(hidden, enc, qw, qb, kw, kb, vw, vb, num_heads: int):
    q, k, v = project_heads(hidden, enc, qw, qb, kw, kb, vw, vb, num_heads)
    return merge_heads(F.scaled_dot_product_attention(q, k, v))


class _Plain(BenchBackend):
    def __init__(self, name, fn, description):
        self.name, self.fn, self.description = name, fn, description


def projections_mk_attention(hidden, enc, qw, qb, kw, kb, vw, vb, num_heads: int):
    """cuBLAS projections + ``mmkernels.attention`` (Triton): the unfused mmkernels route."""
    import mmkernels

    q, k, v = project_heads(hidden, enc, qw, qb, kw, kb, vw, vb, num_heads)
    return merge_heads(mmkernels.attention(q, k, v, backend="triton"))


class _SdpaBackend(_Plain):
    """cuBLAS projections + SDPA pinned to one of torch's backends (flash takes no fp32: it
    shows as skipped with SDPA's reason)."""

    def __init__(self, name, member):
        from .cases_attention import Sdpa

        super().__init__(name, hf_sdpa, f"3 x F.linear + SDPA in sdpa_kernel(SDPBackend.{member})")
        self._sdpa = Sdpa(name, member)
        self.gpu_kernel = self._sdpa.gpu_kernel

    def unavailable(self, device, dtype=None):
        return self._sdpa.unavailable(device, dtype)

    def context(self):
        return self._sdpa.context()


class _MkAttention(_Plain):
    gpu_kernel = True

    def __init__(self):
        super().__init__("mk-attention", projections_mk_attention, "3 x F.linear + mmkernels.attention (Triton)")

    def unavailable(self, device, dtype=None):
        from .registry import mk_backend_unavailable

        return mk_backend_unavailable("attention", "triton", device)


_ARGS = ("hidden", "enc", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias")


class QFormerBench(OpBench):
    name = "qformer"
    title = "mmkernels.qformer_cross_attention (Q-Former cross-attention, K/V projected in-kernel)"
    api = "qformer_cross_attention"
    dispatch_op = "qformer_cross_attention"
    metric = "tflops"
    convention = fl.QFORMER_CONVENTION
    presets = PRESETS

    def parse_shape(self, text):
        kv = parse_kv(text, {k: int for k in ("B", "Lq", "Lk", "Dq", "Dk", "H")})
        shape = QFormerShape(**{**{"B": 32, **_BLIP}, **kv})
        if shape.Dq % shape.H:
            raise ValueError(f"--shape {text!r}: Dq={shape.Dq} is not a multiple of H={shape.H}")
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s: QFormerShape, quick: bool):
        if quick:  # head dim 64 kept, widths cut: seconds on two cores
            return replace(s, B=1, Dq=256, Dk=352, H=4)
        return replace(s, B=min(s.B, 4))

    def describe(self, s: QFormerShape) -> str:
        return f"B={s.B} Lq={s.Lq} Lk={s.Lk} Dq={s.Dq} Dk={s.Dk} H={s.H}"

    def x(self, s: QFormerShape) -> int:
        return s.Lk

    def make_backends(self):
        return {
            "eager": _Plain("eager", hf_eager, "HF eager: 3 x F.linear, matmul, softmax, matmul"),
            "sdpa": _Plain("sdpa", hf_sdpa, "HF sdpa: 3 x F.linear + F.scaled_dot_product_attention"),
            "sdpa-flash": _SdpaBackend("sdpa-flash", "FLASH_ATTENTION"),
            "sdpa-efficient": _SdpaBackend("sdpa-efficient", "EFFICIENT_ATTENTION"),
            "sdpa-cudnn": _SdpaBackend("sdpa-cudnn", "CUDNN_ATTENTION"),
            "sdpa-math": _SdpaBackend("sdpa-math", "MATH"),
            "mk-attention": _MkAttention(),
            "triton": MkBackend("triton", self.dispatch_op, "mmkernels.qformer_cross_attention, fused Triton kernel"),
        }

    def make_inputs(self, s: QFormerShape, dtype, device, generator):
        def rnd(*shape, scale=1.0):
            return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale).to(dtype)

        # weights scaled like a trained Linear (std ~ fan_in^-1/2) so scores stay O(1)
        return {
            "hidden": rnd(s.B, s.Lq, s.Dq), "enc": rnd(s.B, s.Lk, s.Dk),
            "q_weight": rnd(s.Dq, s.Dq, scale=s.Dq ** -0.5), "q_bias": rnd(s.Dq, scale=0.02),
            "k_weight": rnd(s.Dq, s.Dk, scale=s.Dk ** -0.5), "k_bias": rnd(s.Dq, scale=0.02),
            "v_weight": rnd(s.Dq, s.Dk, scale=s.Dk ** -0.5), "v_bias": rnd(s.Dq, scale=0.02),
            "dout": rnd(s.B, s.Lq, s.Dq),
        }

    def bind(self, backend, s: QFormerShape, inputs, device, grad):
        leaves = [inputs[n].detach().requires_grad_(grad) for n in _ARGS]
        H = s.H
        if isinstance(backend, MkBackend):
            import mmkernels

            fn = mmkernels.qformer_cross_attention
        else:
            fn = backend.fn
        return Bound(lambda: fn(*leaves, H), leaves if grad else [], inputs["dout"] if grad else None)

    def reference(self, s: QFormerShape, inputs):
        args = [inputs[n][0:1].double() if n in ("hidden", "enc") else inputs[n].double() for n in _ARGS]
        try:
            from mmkernels.reference.qformer import qformer_cross_attention as ref
        except Exception:
            ref = hf_eager
        return ref(*args, s.H)[0]

    def flops(self, s: QFormerShape, mode):
        return fl.qformer_flops(s.B, s.Lq, s.Lk, s.Dq, s.Dk, s.H, mode=mode)

    def bytes(self, s: QFormerShape, itemsize, mode):
        return fl.qformer_bytes(s.B, s.Lq, s.Lk, s.Dq, s.Dk, itemsize=itemsize, mode=mode)


BENCH = QFormerBench()
