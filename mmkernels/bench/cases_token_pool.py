"""Benchmark cases of ``mmkernels.token_pool``: the visual-token reducer in front of the LLM.

A memory-bound op, so the report's throughput is GB/s (the minimum traffic: x read once, the
output written once) against the device's measured copy bandwidth.

Backends:

==========  ===================================================================================
``eager``   the models' own chain: view as (B, C, h, w), ``F.avg_pool2d`` / ``F.interpolate`` /
            the pixel-shuffle view-permute-reshape, back to tokens, then the norm (in fp32, as
            Gemma 3 and InternVL compute it)
``triton``  ``mmkernels.token_pool`` forced to its Triton kernel (one pass, norm fused)
``cuda``    the same forced to the CUDA extension (``csrc/``), when built
==========  ===================================================================================

Skipped, with the reason, when ``mmkernels.token_pool`` is not in the build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import flops as fl
from .registry import BenchBackend, Bound, MkBackend, OpBench, ShapeSpec, as_bool, parse_kv

__all__ = ["BENCH", "PoolShape", "eager_pool"]

MODES = ("avg", "max", "bilinear", "merge")
NORMS = (None, "layernorm", "rmsnorm")


@dataclass(frozen=True)
class PoolShape:
    """(B, [CLS +] h·w, C) tokens pooled by ``mode`` with ``k`` (avg/max/merge; stride = k) or to
    ``out`` (bilinear: (h', w')), then ``norm``; ``cls``: token 0 is a CLS token, dropped."""

    B: int
    h: int
    w: int
    C: int
    mode: str = "avg"
    k: int = 2
    out: tuple[int, int] | None = None
    cls: bool = False
    norm: str | None = None

    @property
    def n_in(self) -> int:
        return self.h * self.w + (1 if self.cls else 0)

    @property
    def grid_out(self) -> tuple[int, int]:
        if self.mode == "bilinear":
            return self.out or (math.ceil(self.h / 2), math.ceil(self.w / 2))
        if self.mode == "merge":
            return self.h // self.k, self.w // self.k
        return (self.h - self.k) // self.k + 1, (self.w - self.k) // self.k + 1

    @property
    def n_out(self) -> int:
        ho, wo = self.grid_out
        return ho * wo

    @property
    def c_out(self) -> int:
        return self.C * self.k * self.k if self.mode == "merge" else self.C


PRESETS: dict[str, list[ShapeSpec] | str] = {
    "llava-ov": [ShapeSpec("llava-ov", "bilinear-27to14", "LLaVA-OneVision: SigLIP 27x27 tokens -> bilinear 14x14",
                           PoolShape(16, 27, 27, 1152, "bilinear", out=(14, 14)))],
    "gemma3": [ShapeSpec("gemma3", "avg4-rmsnorm", "Gemma 3: SigLIP 64x64 tokens -> AvgPool2d(4) 16x16 + RMSNorm",
                         PoolShape(4, 64, 64, 1152, "avg", k=4, norm="rmsnorm"))],
    "internvl": [ShapeSpec("internvl", "merge2-layernorm", "InternVL 2.5: drop CLS, 32x32 -> pixel shuffle 2x2 "
                           "(16x16 of 4C) + LayerNorm(4C)", PoolShape(8, 32, 32, 1024, "merge", k=2, cls=True,
                                                                      norm="layernorm"))],
    "llava-video": [ShapeSpec("llava-video", "avg2", "LLaVA-NeXT-Video pooler: 16 frames of 24x24 CLIP tokens -> "
                              "avg 2x2 12x12", PoolShape(16, 24, 24, 1024, "avg", k=2))],
    "qwen2vl": "Qwen2-VL's PatchMerger gets its tokens pre-grouped, so its 2x2 merge is a view (nothing to fuse; "
               "its LayerNorm runs per token before the merge)",
    "llava15": "LLaVA-1.5 feeds all 576 CLIP tokens to its MLP projector: no pooling",
    "blip2": "BLIP-2 reduces tokens with the Q-Former's 32 queries: see `mmkernels bench qformer`",
    "instructblip": "InstructBLIP reduces tokens with the Q-Former's 32 queries: see `mmkernels bench qformer`",
}


def eager_pool(x, s: PoolShape, norm_weight=None, norm_bias=None, eps: float = 1e-6):
    """The models' eager chain for ``s`` (norm statistics in fp32, one rounding)."""
    if s.cls:
        x = x[:, 1:]
    B, _, C = x.shape
    if s.mode == "merge":
        y = x.reshape(B, s.h // s.k, s.k, s.w // s.k, s.k, C).permute(0, 1, 3, 2, 4, 5)
        y = y.reshape(B, -1, s.k * s.k * C)
    else:
        img = x.reshape(B, s.h, s.w, C).permute(0, 3, 1, 2)
        if s.mode == "avg":
            img = F.avg_pool2d(img, s.k, s.k)
        elif s.mode == "max":
            img = F.max_pool2d(img, s.k, s.k)
        else:
            img = F.interpolate(img, size=s.grid_out, mode="bilinear", align_corners=False)
        y = img.flatten(2).transpose(1, 2)
    if s.norm is None:
        return y
    yf = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    if s.norm == "layernorm":
        out = F.layer_norm(yf, (yf.shape[-1],), norm_weight.to(yf.dtype), norm_bias.to(yf.dtype), eps)
    else:
        out = yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.to(yf.dtype)
    return out.to(y.dtype)


def _mk_kwargs(s: PoolShape) -> dict:
    kw = dict(grid=(s.h, s.w), mode=s.mode, has_cls=s.cls, norm=s.norm)
    if s.mode == "bilinear":
        kw["output_size"] = s.grid_out
    else:
        kw["kernel_size"] = s.k
    return kw


class _Eager(BenchBackend):
    name = "eager"
    description = "the models' chain: view, F.avg_pool2d / F.interpolate / pixel shuffle, norm in fp32"


def _out_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    return (int(parts[0]), int(parts[-1]))


_SHAPE_KEYS = {"B": int, "h": int, "w": int, "C": int, "mode": str, "k": int, "out": _out_size, "cls": as_bool,
               "norm": str}


class TokenPoolBench(OpBench):
    name = "token_pool"
    title = "mmkernels.token_pool (visual-token pooling / merge + fused norm)"
    api = "token_pool"
    dispatch_op = "token_pool"
    metric = "gbps"
    convention = fl.BYTES_CONVENTION
    presets = PRESETS
    suite_backends = {"cpu": ("eager",), "cuda": ("eager", "triton", "cuda")}

    def model_presets(self):
        return super().model_presets() + ["llava-video"]

    def parse_shape(self, text):
        kv = parse_kv(text, _SHAPE_KEYS, aliases={"grid": "h", "kernel_size": "k", "output_size": "out"})
        if "h" in kv:
            kv.setdefault("w", kv["h"])
        missing = [k for k in ("B", "h", "C") if k not in kv]
        if missing:
            raise ValueError(f"--shape {text!r}: missing {', '.join(missing)} (e.g. B=4,h=64,C=1152,mode=avg,k=4)")
        if kv.get("norm") in ("none", ""):
            kv["norm"] = None
        shape = PoolShape(**kv)
        if shape.mode not in MODES or shape.norm not in NORMS:
            raise ValueError(f"--shape {text!r}: mode in {MODES}, norm in layernorm/rmsnorm/none")
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s: PoolShape, quick: bool):
        return replace(s, B=1 if quick else min(s.B, 2), C=min(s.C, 64 if quick else 256))

    def describe(self, s: PoolShape) -> str:
        how = (f"->{s.grid_out[0]}x{s.grid_out[1]}" if s.mode == "bilinear" else f"k={s.k}")
        return (f"B={s.B} {'cls+' if s.cls else ''}{s.h}x{s.w} C={s.C} {s.mode} {how}"
                + (f" {s.norm}" if s.norm else ""))

    def params(self, s: PoolShape) -> dict:
        d = super().params(s)
        d.update(n_in=s.n_in, n_out=s.n_out, c_out=s.c_out)
        return d

    def x(self, s: PoolShape) -> int:
        return s.h * s.w

    def make_backends(self):
        return {
            "eager": _Eager(),
            "triton": MkBackend("triton", self.dispatch_op, "mmkernels.token_pool, Triton kernel (norm fused)"),
            "cuda": MkBackend("cuda", self.dispatch_op, "mmkernels.token_pool, CUDA extension (csrc/)"),
        }

    def make_inputs(self, s: PoolShape, dtype, device, generator):
        def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
            return (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * scale + shift).to(dt)

        inp = {"x": rnd(s.B, s.n_in, s.C), "dout": rnd(s.B, s.n_out, s.c_out)}
        if s.norm is not None:  # near-1 weights, as trained norms have (fp32: Gemma computes 1 + w in fp32)
            inp["norm_weight"] = rnd(s.c_out, scale=0.1, shift=1.0, dt=torch.float32)
            if s.norm == "layernorm":
                inp["norm_bias"] = rnd(s.c_out, scale=0.1, dt=torch.float32)
        return inp

    def bind(self, backend, s: PoolShape, inputs, device, grad):
        x = inputs["x"].detach().requires_grad_(grad)
        nw, nb = inputs.get("norm_weight"), inputs.get("norm_bias")
        if grad:
            nw = None if nw is None else nw.detach().requires_grad_()
            nb = None if nb is None else nb.detach().requires_grad_()
        leaves = [t for t in (x, nw, nb) if t is not None] if grad else []
        if isinstance(backend, MkBackend):
            import mmkernels

            kw = _mk_kwargs(s)
            fn = lambda: mmkernels.token_pool(x, **kw, norm_weight=nw, norm_bias=nb)  # noqa: E731
        else:
            fn = lambda: eager_pool(x, s, nw, nb)  # noqa: E731
        return Bound(fn, leaves, inputs["dout"] if grad else None)

    def reference(self, s: PoolShape, inputs):
        x = inputs["x"][0:1].double()
        nw, nb = (None if inputs.get(n) is None else inputs[n].double() for n in ("norm_weight", "norm_bias"))
        try:
            from mmkernels.reference.token_pool import token_pool as ref

            return ref(x, **_mk_kwargs(s), norm_weight=nw, norm_bias=nb)[0]
        except ImportError:
            return eager_pool(x, s, nw, nb)[0]

    def flops(self, s, mode):
        return None

    def bytes(self, s: PoolShape, itemsize, mode):
        params = 0 if s.norm is None else s.c_out * (2 if s.norm == "layernorm" else 1)
        return fl.token_pool_bytes(s.B, s.n_in, s.C, s.n_out, s.c_out, itemsize=itemsize, mode=mode,
                                   needs_input_in_bwd=s.mode == "max" or s.norm is not None, norm_params=params)


BENCH = TokenPoolBench()
