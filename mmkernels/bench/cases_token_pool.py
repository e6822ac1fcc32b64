"""Benchmark cases of ``mmkernels.token_pool``: the visual-token reducer in front of the LLM, at
issue 4's shapes — each model's reducer (``eager``: its chain as transformers writes it) at the
batch it runs: LLaVA-OneVision's ``apply_pooling`` (bilinear 27×27 → 14×14), Gemma 3's projector
(AvgPool2d(4) 64×64 → 16×16, ``Gemma3RMSNorm``), InternVL (drop CLS, ``pixel_shuffle(0.5)``,
``LayerNorm(4C)``), LLaVA-NeXT-Video's pooler (AvgPool2d(2) 24×24 → 12×12). A ``--shape`` case's
eager baseline is ``mmkernels.reference.token_pool`` in the input dtype.

Memory-bound: GB/s against the measured copy bandwidth. Bytes: x read once + the output written
once (+ the norm's parameters); ``fwd+bwd`` adds dout read + dx written (+ the parameters' grads);
saved tensors are the implementation's cost, not counted. Backends: ``eager``, ``compile``
(``torch.compile`` of it: does the compiler already fuse it? On a CPU only when ``--backends`` names
it, or with ``MMK_BENCH_COMPILE_CPU=1``), ``triton`` and ``cuda`` (forced); the notes name the faster
fused one per case and mode.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .cases import Backend, Bound, OpBench, ShapeSpec, as_bool, mk_backend, parse_kv

__all__ = ["BENCH", "CHAINS", "PoolShape"]

MODES = ("avg", "max", "bilinear", "merge")
NORMS = (None, "layernorm", "rmsnorm")


@dataclass(frozen=True)
class PoolShape:
    """(B, [CLS +] h·w, C) tokens pooled by ``mode`` with ``k`` (avg/max/merge; stride = k) or to
    ``out`` (bilinear: (h', w')), then ``norm`` with ``eps``; ``cls``: token 0 is a CLS token,
    dropped. ``model``: whose eager chain (a key of :data:`CHAINS`; None: the generic one)."""

    B: int
    h: int
    w: int
    C: int
    mode: str = "avg"
    k: int = 2
    out: tuple[int, int] | None = None
    cls: bool = False
    norm: str | None = None
    eps: float = 1e-6
    model: str | None = None

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
        return self.grid_out[0] * self.grid_out[1]

    @property
    def c_out(self) -> int:
        return self.C * self.k * self.k if self.mode == "merge" else self.C

    @property
    def norm_params(self) -> int:
        return 0 if self.norm is None else self.c_out * (2 if self.norm == "layernorm" else 1)


# the models' chains: f(x, s, weight, bias) with the norm's parameters as the model stores them
def _generic(x, s: PoolShape, weight=None, bias=None):
    """Any ``--shape``: the reference's view/pool/permute chain, run in the input dtype."""
    from mmkernels.reference.token_pool import token_pool

    return token_pool(x, **_mk_kwargs(s), norm_weight=weight, norm_bias=bias)


def _llava_ov(x, s: PoolShape, weight=None, bias=None):
    """``LlavaOnevisionModel.apply_pooling`` (a permuted copy, then interpolate; the result is a view)."""
    b, _, dim = x.shape
    t = x.view(b, s.h, s.w, -1).permute(0, 3, 1, 2).contiguous()
    t = F.interpolate(t, size=list(s.grid_out), mode="bilinear")
    return t.permute(0, 2, 3, 1).view(b, -1, dim)


def _gemma3(x, s: PoolShape, weight, bias=None):
    """``Gemma3MultiModalProjector.forward`` up to ``mm_soft_emb_norm`` (the projection is a matmul)."""
    b, _, c = x.shape
    t = x.transpose(1, 2).reshape(b, c, s.h, s.w).contiguous()
    t = F.avg_pool2d(t, kernel_size=s.k, stride=s.k).flatten(2).transpose(1, 2)
    tf = t.float()  # Gemma3RMSNorm
    out = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + s.eps)
    return (out * (1.0 + weight.float())).type_as(t)


def _internvl(x, s: PoolShape, weight, bias):
    """InternVL's ``extract_feature``: ``[:, 1:]``, ``pixel_shuffle`` (two permuted copies), the
    projector's ``LayerNorm`` (``mlp1[0]``; HF: ``multi_modal_projector.layer_norm``)."""
    if s.cls:
        x = x[:, 1:, :]
    t = x.reshape(x.shape[0], s.h, s.w, -1)
    n, w, h, c = t.size()  # InternVL's names
    t = t.view(n, w, h // s.k, c * s.k).permute(0, 2, 1, 3).contiguous()
    t = t.view(n, h // s.k, w // s.k, c * s.k * s.k).permute(0, 2, 1, 3).contiguous()
    t = t.reshape(n, -1, t.shape[-1])
    return F.layer_norm(t, (t.shape[-1],), weight, bias, s.eps)


def _llava_video(x, s: PoolShape, weight=None, bias=None):
    """``LlavaNextVideoPooler.forward`` with ``spatial_pool_mode="average"`` (``nn.AvgPool2d(k, k)``)."""
    b, _, dim = x.shape
    t = x.view(b, s.h, s.w, dim).permute(0, 3, 1, 2)
    t = F.avg_pool2d(t, kernel_size=s.k, stride=s.k)
    return t.flatten(2).transpose(1, 2).contiguous()


#: each model's eager chain; its norm weight is stored as the model stores it: Gemma3RMSNorm scales by
#: (1 + w) with w near 0, which mmkernels takes as ``norm_weight = 1 + w.float()`` (WEIGHT_OFFSET)
CHAINS: dict[str | None, Callable] = {None: _generic, "llava-ov": _llava_ov, "gemma3": _gemma3,
                                      "internvl": _internvl, "llava-video": _llava_video}
WEIGHT_OFFSET = {"gemma3": 1.0}


def _fused_weight(s: PoolShape, weight, dtype):
    """The model's stored norm weight as ``token_pool``'s ``norm_weight`` (offset added in ``dtype``)."""
    off = WEIGHT_OFFSET.get(s.model)
    return weight if weight is None or not off else off + weight.to(dtype)


PRESETS: dict[str, list[ShapeSpec] | str] = {
    "llava-ov": [ShapeSpec("llava-ov", "bilinear-27to14", "LLaVA-OneVision apply_pooling: SigLIP 27x27 tokens of "
                           "64 images/frames -> bilinear 14x14",
                           PoolShape(64, 27, 27, 1152, "bilinear", out=(14, 14), model="llava-ov"))],
    "gemma3": [ShapeSpec("gemma3", "avg4-rmsnorm", "Gemma 3 projector: SigLIP 64x64 tokens -> AvgPool2d(4) 16x16 + "
                         "Gemma3RMSNorm (1 + w)",
                         PoolShape(8, 64, 64, 1152, "avg", k=4, norm="rmsnorm", model="gemma3"))],
    "internvl": [ShapeSpec("internvl", "merge2-layernorm", "InternVL 2.5: drop CLS, 32x32 -> pixel shuffle 2x2 "
                           "(16x16 of 4C) + LayerNorm(4C)",
                           PoolShape(16, 32, 32, 1024, "merge", k=2, cls=True, norm="layernorm", eps=1e-5,
                                     model="internvl"))],
    "llava-video": [ShapeSpec("llava-video", "avg2", "LLaVA-NeXT-Video pooler: 64 frames of 24x24 CLIP tokens -> "
                              "AvgPool2d(2) 12x12", PoolShape(64, 24, 24, 1024, "avg", k=2, model="llava-video"))],
    "qwen25vl": "Qwen2.5-VL's PatchMerger, as Qwen2-VL's, gets its tokens pre-grouped: its 2x2 merge is a view",
    "qwen2vl": "Qwen2-VL's PatchMerger gets its tokens pre-grouped, so its 2x2 merge is a view (nothing to fuse; "
               "its LayerNorm runs per token before the merge)",
    "llava15": "LLaVA-1.5 feeds all 576 CLIP tokens to its MLP projector: no pooling",
    "blip2": "BLIP-2 reduces tokens with the Q-Former's 32 queries: see `mmkernels bench qformer_cross_attention`",
    "instructblip": "InstructBLIP reduces tokens with the Q-Former's 32 queries: see "
                    "`mmkernels bench qformer_cross_attention`",
}


def _mk_kwargs(s: PoolShape) -> dict:
    kw = dict(grid=(s.h, s.w), mode=s.mode, has_cls=s.cls, norm=s.norm, eps=s.eps)
    kw.update({"output_size": s.grid_out} if s.mode == "bilinear" else {"kernel_size": s.k})
    return kw


def _mk_call(s: PoolShape):
    import mmkernels

    kw = _mk_kwargs(s)
    # the weight's offset is added per call, as the drop-in module does (mk.nn.Gemma3MultiModalProjector)
    return lambda x, nw, nb: mmkernels.token_pool(x, **kw, norm_weight=_fused_weight(s, nw, torch.float32),
                                                  norm_bias=nb)


def _eager_call(s: PoolShape):
    return lambda x, nw, nb: CHAINS[s.model](x, s, nw, nb)


class _Compiled:
    """``torch.compile`` of each model's chain: one static graph per shape and grad mode."""

    def __init__(self):
        self.compiled: dict = {}

    def __call__(self, s: PoolShape):
        fn = CHAINS[s.model]
        if fn not in self.compiled:
            import torch._dynamo.config as dcfg

            # past the default recompile limit of 8 (custom shapes) dynamo would silently run eagerly
            dcfg.recompile_limit = max(dcfg.recompile_limit, 256)
            self.compiled[fn] = torch.compile(fn, dynamic=False)
        return lambda x, nw, nb: self.compiled[fn](x, s, nw, nb)


def _compile_cpu_opt_in() -> str | None:
    # measured on the 2-core CI box: inductor's C++ build took 8.6 s for the first graph and ~5 s
    # for each later one, a minute for the presets against a few seconds for the rest
    if os.environ.get("MMK_BENCH_COMPILE_CPU"):
        return None
    return ("torch.compile: on a CPU inductor builds C++ for ~5 s per shape and mode, so it is timed there only when "
            "--backends names it (or MMK_BENCH_COMPILE_CPU=1)")


def _out_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    return (int(parts[0]), int(parts[-1]))


_SHAPE_KEYS = {"B": int, "h": int, "w": int, "C": int, "mode": str, "k": int, "out": _out_size, "cls": as_bool,
               "norm": str, "eps": float}


class TokenPoolBench(OpBench):
    name = "token_pool"
    title = "mmkernels.token_pool (visual-token pooling / merge + fused norm)"
    api = "token_pool"
    metric = "gbps"
    convention = ("minimum traffic: fwd reads x once and writes the output once (+ the norm's weight/bias read once); "
                  "bwd reads dout once and writes dx once (+ dweight/dbias written once); fwd+bwd = the sum; "
                  "saved tensors and workspaces are not counted (they are the implementation's cost)")
    presets = PRESETS
    extra_presets = ("llava-video",)
    default_modes = ("fwd", "fwd+bwd")
    suite_backends = {"cpu": ("eager",), "cuda": ("eager", "triton", "cuda")}
    grad_checked = ("x",)

    def parse_shape(self, text):
        kv = parse_kv(text, _SHAPE_KEYS, aliases={"grid": "h", "kernel_size": "k", "output_size": "out"})
        if "h" in kv:
            kv.setdefault("w", kv["h"])
        missing = [k for k in ("B", "h", "C") if k not in kv]
        if missing:
            raise ValueError(f"--shape {text!r}: missing {', '.join(missing)} (e.g. B=4,h=64,C=1152,mode=avg,k=4)")
        shape = PoolShape(**{**kv, "norm": None if kv.get("norm") in ("none", "") else kv.get("norm")})
        if shape.mode not in MODES or shape.norm not in NORMS:
            raise ValueError(f"--shape {text!r}: mode in {MODES}, norm in layernorm/rmsnorm/none")
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s, quick):
        return replace(s, B=1 if quick else min(s.B, 2), C=min(s.C, 64 if quick else 256))

    def describe(self, s):
        how = f"->{s.grid_out[0]}x{s.grid_out[1]}" if s.mode == "bilinear" else f"k={s.k}"
        return f"B={s.B} {'cls+' if s.cls else ''}{s.h}x{s.w} C={s.C} {s.mode} {how}" + (f" {s.norm}" if s.norm else "")

    def params(self, s):
        return {**super().params(s), "n_in": s.n_in, "n_out": s.n_out, "c_out": s.c_out}

    def x(self, s):
        return s.h * s.w

    def backends(self):
        return {
            "eager": Backend("eager", "the model's chain as transformers writes it (view/permute, pool, norm)",
                             _eager_call),
            "compile": Backend("compile", "torch.compile of the eager chain (static shapes)", _Compiled(),
                               cpu_opt_in=_compile_cpu_opt_in()),
            "triton": mk_backend("token_pool", "triton", _mk_call, "mmkernels.token_pool, Triton kernel (norm fused)"),
            "cuda": mk_backend("token_pool", "cuda", _mk_call, "mmkernels.token_pool, CUDA extension (csrc/)"),
        }

    def make_inputs(self, s, dtype, device, generator):
        def rnd(*shape, scale=1.0, shift=0.0):
            return (torch.randn(shape, generator=generator, device=device) * scale + shift).to(dtype)

        inp = {"x": rnd(s.B, s.n_in, s.C), "dout": rnd(s.B, s.n_out, s.c_out)}
        if s.norm is not None:  # random, as trained norms are, in the model's dtype, as it stores them
            inp["norm_weight"] = rnd(s.c_out, scale=0.1, shift=0.0 if s.model in WEIGHT_OFFSET else 1.0)
            if s.norm == "layernorm":
                inp["norm_bias"] = rnd(s.c_out, scale=0.1)
        return inp

    def bind(self, backend, s, inputs, grad):
        fn = backend.call(s)
        leaves = {n: inputs[n].detach().requires_grad_(grad) for n in ("x", "norm_weight", "norm_bias") if n in inputs}
        x, nw, nb = (leaves.get(n) for n in ("x", "norm_weight", "norm_bias"))
        return Bound(lambda: fn(x, nw, nb), leaves if grad else {}, inputs["dout"] if grad else None)

    def reference(self, s, inputs, grad=False):
        """``mmkernels.reference.token_pool`` in float64 on batch element 0 (and x's gradient)."""
        from mmkernels.reference.token_pool import token_pool as ref

        x = inputs["x"][0:1].double().requires_grad_(grad)
        nw, nb = (None if inputs.get(n) is None else inputs[n].double() for n in ("norm_weight", "norm_bias"))
        with torch.set_grad_enabled(grad):
            out = ref(x, **_mk_kwargs(s), norm_weight=_fused_weight(s, nw, torch.float64), norm_bias=nb)
        if grad:
            out.backward(inputs["dout"][0:1].double())
        return out.detach()[0], {"x": x.grad[0]} if grad else {}

    def bytes(self, s, itemsize, mode):
        x, out, params = s.B * s.n_in * s.C, s.B * s.n_out * s.c_out, s.norm_params
        return float(itemsize * (x + out + params) * (2 if mode == "fwd+bwd" else 1))

    def summary_notes(self, rows):
        """Which fused backend was faster, per case and mode (both timed, both outputs correct)."""
        fused: dict[tuple, list[dict]] = {}
        for r in rows:
            if r["backend"] in ("triton", "cuda") and r["status"] == "ok" and (r.get("check") or {}).get("ok"):
                fused.setdefault((r["preset"], r["case"], r["dtype"], r["mode"]), []).append(r)
        parts = [f"{p}/{c} {dt} {m}: {fast['backend']} ({fast['ms_p50']:.4g} ms vs {slow['backend']} "
                 f"{slow['ms_p50']:.4g} ms)" for (p, c, dt, m), rs in fused.items() if len(rs) > 1
                 for fast, slow in [sorted(rs, key=lambda r: r["ms_p50"])[:2]]]
        return ["faster fused backend: " + "; ".join(parts)] if parts else []


BENCH = TokenPoolBench()
