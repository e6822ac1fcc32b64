"""Benchmark cases of ``mmkernels.attention``: the vision encoders' and Q-Former's attention.

Backends (names as in reports and ``--backends``):

========================  ===============================================================
``eager``                 ``mmkernels.reference.attention.attention``: matmul + softmax + matmul
                          in the input dtype (what a model without fused attention runs)
``sdpa``                  ``F.scaled_dot_product_attention`` with torch's own backend choice
``sdpa-flash`` ...        SDPA inside ``sdpa_kernel(SDPBackend.X)``: ``-flash``, ``-efficient``,
                          ``-cudnn`` (CUDA only), ``-math``
``flex``                  ``torch.compile(flex_attention)``, causal as a block mask (CUDA only)
``flash-attn``            ``flash_attn_func`` on (B, L, H, D) inputs (when importable)
``xformers``              ``xformers.ops.memory_efficient_attention`` (when importable)
``triton``                ``mmkernels.attention(..., backend="triton")``
``triton-pad``            the same kernel with the head dim padded to the next power of two
                          instead of split (88 -> 128 rather than 64 + 32): what the split saves
``cuda``                  mmkernels' CUDA-extension backend, when one is registered
========================  ===============================================================

The backend classes keep the call convention of ``benchmarks/bench_attention.py`` (which imports
them): ``prepare(case, device) -> Prepared(call, layout)`` with ``case`` carrying ``Lq``, ``Lk``,
``d``, ``causal``, ``scale`` (and ``mask``); ``call(q, k, v[, attn_mask=])``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from . import flops as fl
from .registry import BenchBackend, Bound, OpBench, ShapeSpec, Skip, as_bool, mk_backend_unavailable, parse_kv
from .report import short_text

__all__ = ["AttnShape", "BENCH", "Prepared", "make_backends", "ref_out_slice"]

GIB = 1 << 30
MIB = 1 << 20
CHECK_HEADS = 2


# --------------------------------------------------------------------------------------
# shapes and presets (DESIGN.md, "Real shapes")
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnShape:
    """(B, H, Lq, d) queries against (B, H, Lk, d) keys / (B, H, Lk, dv) values.

    ``mask``: None, or ``"pad"``: a (B, 1, 1, Lk) bool padding mask (True = attend), batch
    element b keeping the first Lk - (b % 4)·Lk/8 keys — the HF padding mask of a text batch."""

    B: int
    H: int
    Lq: int
    Lk: int
    d: int
    dv: int | None = None
    causal: bool = False
    mask: str | None = None

    @property
    def L(self) -> int:
        return self.Lk

    @property
    def Dv(self) -> int:
        return self.d if self.dv is None else self.dv

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.d)


def _s(preset, id_, label, B, H, Lq, Lk, d, dtype=None, **kw) -> ShapeSpec:
    return ShapeSpec(preset, id_, label, AttnShape(B, H, Lq, Lk, d, **kw), dtype)


_EVA = ("eva-vitg", "EVA ViT-g/14 vision self-attn (39 layers)", 32, 16, 257, 257, 88)
_QF_CROSS = ("qformer-cross", "Q-Former cross-attn, 32 queries x 257 image tokens (fp32, as HF keeps it)",
             32, 12, 32, 257, 64, "float32")
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "blip2": [
        _s("blip2", *_EVA),
        _s("blip2", "qformer-self", "Q-Former self-attn, 32 queries (fp32, as HF keeps it)",
           32, 12, 32, 32, 64, "float32"),
        _s("blip2", *_QF_CROSS),
    ],
    "instructblip": [
        _s("instructblip", *_EVA),
        _s("instructblip", "qformer-self-text", "Q-Former self-attn, 32 queries + 32 instruction tokens, "
           "padding mask (fp32)", 32, 12, 64, 64, 64, "float32", mask="pad"),
        _s("instructblip", *_QF_CROSS),
    ],
    "llava15": [_s("llava15", "clip-vitl336", "CLIP ViT-L/14-336 vision self-attn (24 layers)",
                   16, 16, 577, 577, 64)],
    "llava-ov": [_s("llava-ov", "siglip-384", "SigLIP so400m/14-384 vision self-attn", 16, 16, 729, 729, 72)],
    "gemma3": [_s("gemma3", "siglip-896", "SigLIP 896 vision self-attn (Gemma 3)", 4, 16, 4096, 4096, 72)],
    "qwen2vl": [
        _s("qwen2vl", "vit-16k", "Qwen2-VL ViT, one 16k-token image (packed batch of one)",
           1, 16, 16384, 16384, 80),
        _s("qwen2vl", "vit-4x4k", "Qwen2-VL ViT, 4 images of 4096 tokens", 4, 16, 4096, 4096, 80),
    ],
    "internvl": [_s("internvl", "internvit-300m", "InternViT-300M vision self-attn (InternVL 2.5)",
                    8, 16, 1025, 1025, 64)],
    "sweep": "generated: d = 64, H = 16, B·L = 16384 tokens, L = 256 ... 16384 (CPU: 64 ... 512)",
}


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
@dataclass
class Prepared:
    call: object  # (q, k, v[, attn_mask=]) -> out, all in `layout`
    layout: str = "bhld"  # or "blhd": inputs/outputs are (B, L, H, D)


def _no_mask(case, who: str) -> None:
    if getattr(case, "mask", None):
        raise Skip(f"{who} is not benchmarked with a padding mask")


class Backend(BenchBackend):
    # bytes per element of the B·H·Lq·Lk scores it materialises (None: flash-style, O(L) memory)
    score_itemsize = None

    def score_bytes(self, dtype) -> int | None:
        return None

    def prepare(self, case, device) -> Prepared:
        raise NotImplementedError


class Eager(Backend):
    name = "eager"
    description = "mmkernels.reference.attention: matmul + softmax + matmul in the input dtype"

    def __init__(self, dtype=None):
        if dtype is not None:
            self.score_itemsize = torch.empty((), dtype=dtype).element_size()

    def score_bytes(self, dtype):
        return torch.empty((), dtype=dtype).element_size()

    def unavailable(self, device, dtype=None):
        try:
            from mmkernels.reference.attention import attention  # noqa: F401
        except Exception as exc:
            return f"cannot import mmkernels.reference.attention: {exc!r}"
        return None

    def prepare(self, case, device):
        from mmkernels.reference.attention import attention

        causal, scale = case.causal, case.scale
        return Prepared(lambda q, k, v, attn_mask=None: attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                                                  scale=scale))


class Triton(Backend):
    name = "triton"
    description = 'mmkernels.attention(..., backend="triton")'
    gpu_kernel = True
    mk_name = "triton"

    def unavailable(self, device, dtype=None):
        try:
            import mmkernels  # noqa: F401
        except Exception as exc:
            return f"cannot import mmkernels: {exc!r}"
        return mk_backend_unavailable("attention", self.mk_name, device)

    def prepare(self, case, device):
        import mmkernels

        causal, scale, name = case.causal, case.scale, self.mk_name
        return Prepared(lambda q, k, v, attn_mask=None: mmkernels.attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, backend=name))


class TritonPad(Triton):
    """The Triton kernel with the head dim padded to the next power of two instead of split
    into power-of-two chunks (88 → 128 rather than 64+32): measures what the split saves."""

    name = "triton-pad"
    description = "the triton kernel with MMKERNELS_ATTN_SPLIT_HEAD_DIM=0 (head dim padded, not split)"

    def context(self):
        @contextlib.contextmanager
        def padded():
            old = os.environ.get("MMKERNELS_ATTN_SPLIT_HEAD_DIM")
            os.environ["MMKERNELS_ATTN_SPLIT_HEAD_DIM"] = "0"
            try:
                yield
            finally:
                if old is None:
                    os.environ.pop("MMKERNELS_ATTN_SPLIT_HEAD_DIM", None)
                else:
                    os.environ["MMKERNELS_ATTN_SPLIT_HEAD_DIM"] = old

        return padded()

    def prepare(self, case, device):
        if case.d & (case.d - 1) == 0:
            raise Skip(f"d={case.d} is a power of two: nothing to split, same kernel as triton")
        return super().prepare(case, device)


class CudaExt(Triton):
    name = "cuda"
    description = 'mmkernels.attention(..., backend="cuda") (the csrc/ extension)'
    mk_name = "cuda"


class Sdpa(Backend):
    def __init__(self, name, member, dtype=None):
        self.name, self.member = name, member
        self.gpu_kernel = member in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
        self.description = ("F.scaled_dot_product_attention, torch's backend choice" if member is None else
                            f"F.scaled_dot_product_attention in sdpa_kernel(SDPBackend.{member})")
        if member == "MATH" and dtype is not None:
            # the math path upcasts fp16/bf16 to fp32 (torch >= 2.5) and materialises L×L
            self.score_itemsize = max(4, torch.empty((), dtype=dtype).element_size())

    def score_bytes(self, dtype):
        return max(4, torch.empty((), dtype=dtype).element_size()) if self.member == "MATH" else None

    def unavailable(self, device, dtype=None):
        if self.member is None:
            return None
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: F401
        except Exception as exc:
            return f"torch.nn.attention.sdpa_kernel unavailable: {exc!r}"
        if not hasattr(SDPBackend, self.member):
            return f"SDPBackend.{self.member} does not exist in torch {torch.__version__}"
        if getattr(device, "type", device) != "cuda" and self.gpu_kernel:
            return f"SDPBackend.{self.member} is CUDA-only"
        return None

    def context(self):
        if self.member is None:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, self.member)])

    def prepare(self, case, device):
        causal, scale = case.causal, case.scale
        return Prepared(lambda q, k, v, attn_mask=None: F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale))


class Flex(Backend):
    name = "flex"
    description = "torch.compile(flex_attention), causal as a block mask"
    gpu_kernel = True

    def __init__(self):
        self._compiled = None
        self._masks = {}

    def unavailable(self, device, dtype=None):
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
        except Exception as exc:
            return f"torch.nn.attention.flex_attention unavailable: {exc!r}"
        if getattr(device, "type", device) != "cuda" and not os.environ.get("MMK_BENCH_FLEX_CPU"):
            # the CPU code path compiles for tens of seconds per shape and is not what users run
            return "FlexAttention is benchmarked on CUDA only"
        return None

    def prepare(self, case, device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _no_mask(case, "flex")
        if self._compiled is None:
            # one static compile per shape (fair timings); the default limit of 8 recompiles
            # would silently fall back to unfused eager flex after the 8th shape
            import torch._dynamo.config as dcfg

            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dcfg, name):
                    setattr(dcfg, name, max(getattr(dcfg, name), 1024))
            for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
                if hasattr(dcfg, name):
                    setattr(dcfg, name, max(getattr(dcfg, name), 4096))
            self._compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if case.causal:
            key = (case.Lq, case.Lk, str(device))
            if key not in self._masks:
                def causal_mod(b, h, q_idx, kv_idx):
                    return q_idx >= kv_idx
                self._masks = {key: create_block_mask(causal_mod, None, None, case.Lq, case.Lk, device=device)}
            block_mask = self._masks[key]
        fn, scale = self._compiled, case.scale
        return Prepared(lambda q, k, v: fn(q, k, v, block_mask=block_mask, scale=scale))


class FlashAttn(Backend):
    name = "flash-attn"
    description = "flash_attn.flash_attn_func on (B, L, H, D)"
    gpu_kernel = True

    def unavailable(self, device, dtype=None):
        if getattr(device, "type", device) != "cuda":
            return "flash-attn is CUDA-only"
        try:
            from flash_attn import flash_attn_func  # noqa: F401
        except Exception as exc:
            return f"flash_attn not importable: {short_text(repr(exc), 200)}"
        return None

    def prepare(self, case, device):
        from flash_attn import flash_attn_func

        if getattr(case, "mask", None):
            raise Skip("flash_attn_func takes no padding mask (that needs the varlen API)")
        causal, scale = case.causal, case.scale
        return Prepared(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, softmax_scale=scale),
                        layout="blhd")


class Xformers(Backend):
    name = "xformers"
    description = "xformers.ops.memory_efficient_attention on (B, L, H, D)"
    gpu_kernel = True

    def unavailable(self, device, dtype=None):
        if getattr(device, "type", device) != "cuda":
            return "xformers is benchmarked on CUDA only"
        try:
            import xformers.ops  # noqa: F401
        except Exception as exc:
            return f"xformers not importable: {short_text(repr(exc), 200)}"
        return None

    def prepare(self, case, device):
        import xformers.ops as xops

        _no_mask(case, "xformers")
        if case.causal and case.Lq != case.Lk:
            raise Skip("xformers' LowerTriangularMask is bottom-right aligned for Lq != Lk; SDPA's is top-left")
        bias = xops.LowerTriangularMask() if case.causal else None
        scale = case.scale
        return Prepared(lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale),
                        layout="blhd")


def make_backends(dtype=None) -> dict[str, Backend]:
    """Every attention backend, in report order (``dtype`` only sets the legacy
    ``score_itemsize`` attribute that ``benchmarks/bench_attention.py`` reads)."""
    return {
        "eager": Eager(dtype),
        "sdpa": Sdpa("sdpa", None, dtype),
        "sdpa-flash": Sdpa("sdpa-flash", "FLASH_ATTENTION", dtype),
        "sdpa-efficient": Sdpa("sdpa-efficient", "EFFICIENT_ATTENTION", dtype),
        "sdpa-cudnn": Sdpa("sdpa-cudnn", "CUDNN_ATTENTION", dtype),
        "sdpa-math": Sdpa("sdpa-math", "MATH", dtype),
        "flex": Flex(),
        "flash-attn": FlashAttn(),
        "xformers": Xformers(),
        "triton": Triton(),
        "triton-pad": TritonPad(),
        "cuda": CudaExt(),
    }


# --------------------------------------------------------------------------------------
# float64 reference on a slice
# --------------------------------------------------------------------------------------
def ref_out_slice(q, k, v, causal, scale, nh, mask=None) -> torch.Tensor:
    """float64 attention of batch 0, heads [0, nh), chunked over query rows (bounded memory).

    ``mask``: bool (True = attend) or additive, broadcastable to (B, H, Lq, Lk)."""
    qs, ks, vs = (t[0, :nh].double() for t in (q, k, v))
    Lq, Lk = qs.shape[1], ks.shape[1]
    m = None
    if mask is not None:
        m = mask[0] if mask.dim() == 4 else mask
        m = m[:nh] if m.shape[0] > 1 else m
    out = torch.empty(nh, Lq, vs.shape[-1], dtype=torch.float64, device=q.device)
    rows = max(1, min(Lq, (256 * MIB) // (nh * Lk * 8)))
    cols = torch.arange(Lk, device=q.device)
    for i in range(0, Lq, rows):
        s = torch.matmul(qs[:, i:i + rows], ks.transpose(-1, -2)) * scale
        if causal:
            r = torch.arange(i, min(i + rows, Lq), device=q.device)
            s.masked_fill_(cols[None, :] > r[:, None], float("-inf"))
        if m is not None:
            mi = m[..., i:i + rows, :] if m.shape[-2] > 1 else m
            if mi.dtype == torch.bool:
                s.masked_fill_(~mi, float("-inf"))
            else:
                s = s + mi.double()
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # fully masked rows: 0, as mk.attention
        out[:, i:i + rows] = torch.matmul(p, vs)
    return out


def _to_layout(t, layout):
    return t.transpose(1, 2).contiguous() if layout == "blhd" else t


def _from_layout(t, layout):
    return t.transpose(1, 2) if layout == "blhd" else t


# --------------------------------------------------------------------------------------
# the op's benchmark
# --------------------------------------------------------------------------------------
_SWEEP_GPU = (256, 512, 1024, 2048, 4096, 8192, 16384)
_SWEEP_CPU = (64, 128, 256, 512)
_SHAPE_KEYS = {"B": int, "H": int, "Lq": int, "Lk": int, "L": int, "d": int, "dv": int, "causal": as_bool,
               "mask": str}


class AttentionBench(OpBench):
    name = "attention"
    title = "mmkernels.attention (scaled-dot-product attention)"
    api = "attention"
    dispatch_op = "attention"
    metric = "tflops"
    convention = fl.ATTENTION_CONVENTION
    presets = PRESETS

    def preset_specs(self, preset: str, *, cpu: bool, quick: bool) -> list[ShapeSpec]:
        if preset != "sweep":
            entry = self.presets[preset]
            return list(entry) if isinstance(entry, list) else []
        Ls = _SWEEP_CPU[:3] if (cpu and quick) else _SWEEP_CPU if cpu else _SWEEP_GPU[1:6:2] if quick else _SWEEP_GPU
        tokens, H = (512, 2) if cpu else (16384, 16)
        return [ShapeSpec("sweep", f"L{L}", f"d=64 sweep, B·L = {tokens} tokens",
                          AttnShape(max(1, tokens // L), H, L, L, 64), cpu_sized=cpu) for L in Ls]

    def parse_shape(self, text: str) -> ShapeSpec:
        kv = parse_kv(text, _SHAPE_KEYS)
        if "L" in kv:
            kv.setdefault("Lq", kv["L"])
            kv.setdefault("Lk", kv.pop("L"))
        kv.pop("L", None)
        missing = [k for k in ("B", "H", "Lq", "Lk", "d") if k not in kv]
        if missing:
            raise ValueError(f"--shape {text!r}: missing {', '.join(missing)} (e.g. B=16,H=16,L=577,d=64)")
        if kv.get("mask") not in (None, "pad", "none"):
            raise ValueError(f"--shape {text!r}: mask must be 'pad' or 'none'")
        if kv.get("mask") == "none":
            kv["mask"] = None
        shape = AttnShape(**kv)
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, shape: AttnShape, quick: bool) -> AttnShape:
        cap_l = 128 if quick else 512
        return replace(shape, B=1 if quick else min(shape.B, 2), H=min(shape.H, 2 if quick else 4),
                       Lq=min(shape.Lq, cap_l), Lk=min(shape.Lk, cap_l))

    def describe(self, s: AttnShape) -> str:
        L = f"L={s.Lq}" if s.Lq == s.Lk else f"Lq={s.Lq} Lk={s.Lk}"
        extra = (f" dv={s.dv}" if s.dv not in (None, s.d) else "") + (" causal" if s.causal else "") + \
            (f" mask={s.mask}" if s.mask else "")
        return f"B={s.B} H={s.H} {L} d={s.d}{extra}"

    def x(self, s: AttnShape) -> int:
        return s.Lk

    # ---- backends --------------------------------------------------------------------
    def make_backends(self):
        return make_backends()

    def default_backends(self, device):
        names = [n for n in make_backends() if n not in ("sdpa", "triton-pad")]
        notes = {"sdpa": "torch's own choice among the sdpa-* backends",
                 "triton-pad": "the triton kernel with the head dim padded, not split (the split's gain)"}
        from .._utils import interpreting

        if getattr(device, "type", device) == "cpu" and interpreting():
            names.remove("triton")
            notes["triton"] = ("TRITON_INTERPRET=1 runs the Triton kernel in the interpreter: a correctness "
                               "tool, far too slow for timings to mean anything")
        return names, notes

    # ---- inputs, calls, checks -------------------------------------------------------
    def make_inputs(self, s: AttnShape, dtype, device, generator):
        def rnd(*shape):
            return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

        inp = {"q": rnd(s.B, s.H, s.Lq, s.d), "k": rnd(s.B, s.H, s.Lk, s.d), "v": rnd(s.B, s.H, s.Lk, s.Dv),
               "dout": rnd(s.B, s.H, s.Lq, s.Dv)}
        if s.mask == "pad":
            keep = s.Lk - (torch.arange(s.B, device=device) % 4) * max(1, s.Lk // 8)
            inp["mask"] = (torch.arange(s.Lk, device=device)[None, :] < keep[:, None]).view(s.B, 1, 1, s.Lk)
        return inp

    def bind(self, backend: Backend, s: AttnShape, inputs, device, grad):
        prep = backend.prepare(s, device)
        layout = prep.layout
        leaves = [_to_layout(inputs[n], layout).detach().requires_grad_(grad) for n in ("q", "k", "v")]
        call, mask = prep.call, inputs.get("mask")
        fn = (lambda: call(*leaves)) if mask is None else (lambda: call(*leaves, attn_mask=mask))
        return Bound(fn, leaves if grad else [], _to_layout(inputs["dout"], layout) if grad else None,
                     lambda o: _from_layout(o, layout))

    def reference(self, s: AttnShape, inputs):
        nh = min(CHECK_HEADS, s.H)
        return ref_out_slice(inputs["q"], inputs["k"], inputs["v"], s.causal, s.scale, nh, inputs.get("mask"))

    def ref_slice(self, out):
        return out[0, :CHECK_HEADS]

    def memory_guard(self, backend, s: AttnShape, dtype, mode, device):
        itemsize = backend.score_bytes(dtype) if hasattr(backend, "score_bytes") else None
        if not itemsize:
            return None
        # eager and math hold ~3 B·H·Lq·Lk tensors at the peak forward and ~6 with autograd
        # (measured on the reference: scores, shifted, exp, probs)
        factor = 3 if mode == "fwd" else 6
        need = factor * s.B * s.H * s.Lq * s.Lk * itemsize
        if getattr(device, "type", device) == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            limit = min(20 * GIB, 0.85 * (free + torch.cuda.memory_reserved(device)
                                          - torch.cuda.memory_allocated(device)))
        else:
            limit = 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > limit:
            return (f"needs ~{need / GIB:.1f} GiB for the Lq×Lk scores ({factor} × B·H·Lq·Lk × {itemsize} B) "
                    f"> {limit / GIB:.1f} GiB available")
        return None

    def flops(self, s: AttnShape, mode):
        return fl.attention_flops(s.B, s.H, s.Lq, s.Lk, s.d, s.Dv, causal=s.causal, mode=mode)

    def bytes(self, s: AttnShape, itemsize, mode):
        return fl.attention_bytes(s.B, s.H, s.Lq, s.Lk, s.d, s.Dv, itemsize=itemsize, mode=mode)


BENCH = AttentionBench()
