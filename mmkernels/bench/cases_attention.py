"""Benchmark cases of ``mmkernels.attention``: the vision encoders' and the Q-Former's attention.

Backends: ``eager`` (``mmkernels.reference.attention``: matmul + softmax + matmul in the input dtype,
what a model without fused attention runs); ``sdpa-flash``, ``-efficient``, ``-cudnn``, ``-math``
(SDPA pinned with ``sdpa_kernel``) and ``sdpa`` (torch's choice, opt-in); ``flex``
(``torch.compile(flex_attention)``, CUDA only); ``flash-attn`` and ``xformers`` (when importable);
``triton`` (``mmkernels.attention`` forced to its Triton kernels), ``triton-fp8`` (opt-in: the same
with ``fp8="dynamic"``; forward only, its own output bound ``fp8_out_rtol()``) and ``triton-pad``
(opt-in: the launchers' ``split=False``, the head dim padded to a power of two instead of split —
88 -> 128 rather than 64 + 32 — what the split saves).

FLOPs (the FlashAttention papers' convention): fwd = 2·B·H·Lq·Lk·(d + dv), halved when causal;
bwd = 2.5 × fwd (five matmuls to the forward's two); fwd+bwd = 3.5 × fwd; softmax and masks not
counted (a padding mask does not reduce the count).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from .cases import Backend, Bound, OpBench, ShapeSpec, Skip, as_bool, mk_backend, mk_unavailable, parse_kv

__all__ = ["BENCH", "AttnShape", "attention_flops", "sdpa_backend"]

GIB, MIB = 1 << 30, 1 << 20
CHECK_HEADS = 2
#: the float64 gradient check runs when its slice's scores are at most this many elements
GRAD_CHECK_MAX = 1 << 24
CONVENTION = ("fwd = 2*B*H*Lq*Lk*(d+dv) (QK^T and PV, 2 FLOPs per multiply-add), halved when causal; bwd = 2.5 * fwd; "
              "fwd+bwd = 3.5 * fwd; softmax/exp and masks not counted (the FlashAttention papers' convention)")
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass(frozen=True)
class AttnShape:
    """(B, H, Lq, d) queries against (B, H, Lk, d) keys and (B, H, Lk, dv) values. ``mask="pad"``:
    a (B, 1, 1, Lk) bool padding mask (True = attend), batch element b keeping the first
    Lk - (b % 4)·Lk/8 keys — the HF padding mask of a text batch."""

    B: int
    H: int
    Lq: int
    Lk: int
    d: int
    dv: int | None = None
    causal: bool = False
    mask: str | None = None

    @property
    def Dv(self) -> int:
        return self.d if self.dv is None else self.dv

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.d)


def attention_flops(B, H, Lq, Lk, d, dv=None, *, causal=False, mode="fwd") -> float:
    return 2.0 * B * H * Lq * Lk * (d + (d if dv is None else dv)) * (0.5 if causal else 1.0) * MODE_FACTOR[mode]


def _s(preset, id_, label, B, H, Lq, Lk, d, dtype=None, **kw) -> ShapeSpec:
    return ShapeSpec(preset, id_, label, AttnShape(B, H, Lq, Lk, d, **kw), dtype)


_EVA = ("eva-vitg", "EVA ViT-g/14 vision self-attn (39 layers)", 32, 16, 257, 257, 88)
_QF_CROSS = ("qformer-cross", "Q-Former cross-attn, 32 queries x 257 image tokens (fp32, as HF keeps it)",
             32, 12, 32, 257, 64, "float32")
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "blip2": [_s("blip2", *_EVA), _s("blip2", *_QF_CROSS),
              _s("blip2", "qformer-self", "Q-Former self-attn, 32 queries (fp32, as HF keeps it)",
                 32, 12, 32, 32, 64, "float32")],
    "instructblip": [_s("instructblip", *_EVA), _s("instructblip", *_QF_CROSS),
                     _s("instructblip", "qformer-self-text", "Q-Former self-attn, 32 queries + 32 instruction "
                        "tokens, padding mask (fp32)", 32, 12, 64, 64, 64, "float32", mask="pad")],
    "llava15": [_s("llava15", "clip-vitl336", "CLIP ViT-L/14-336 vision self-attn (24 layers)", 16, 16, 577, 577, 64)],
    "llava-ov": [_s("llava-ov", "siglip-384", "SigLIP so400m/14-384 vision self-attn", 16, 16, 729, 729, 72)],
    "gemma3": [_s("gemma3", "siglip-896", "SigLIP 896 vision self-attn (Gemma 3)", 4, 16, 4096, 4096, 72)],
    "qwen2vl": [_s("qwen2vl", "vit-16k", "Qwen2-VL ViT, one 16k-token image (packed batch of one)",
                   1, 16, 16384, 16384, 80),
                _s("qwen2vl", "vit-4x4k", "Qwen2-VL ViT, 4 images of 4096 tokens", 4, 16, 4096, 4096, 80)],
    "qwen25vl": "Qwen2.5-VL's ViT attends within packed windows (cu_window_seqlens): see "
                "`mmkernels bench attention_varlen`",
    "internvl": [_s("internvl", "internvit-300m", "InternViT-300M vision self-attn (InternVL 2.5)",
                    8, 16, 1025, 1025, 64)],
    # not a default preset (explicit --preset): `mmkernels bench attention_varlen --preset qwen3vl-tower`
    # times the same shapes packed, next to these dense calls (scripts/gpu_check.sh)
    "qwen3vl-tower": [_s("qwen3vl-tower", f"vit-{S}", f"Qwen3-VL ViT full attention, one {S}-token image "
                         f"({int(S ** 0.5)}^2 patches) as a dense batch of one", 1, 16, S, S, 72)
                      for S in (8836, 15376, 35344)],
    "sweep": "generated: B·L = 16384 tokens, H·d = 2048, d = 64, 128, 88, L = 512 ... 16384, causal and not "
             "(CPU: 512 tokens, H·d = 128, d = 64, 88, L = 64 ... 256)",
}


# backends: `call(shape)` returns f(q, k, v, attn_mask=None) in the backend's layout, or raises Skip
def _no_mask(s: AttnShape, who: str) -> None:
    if s.mask:
        raise Skip(f"{who} is not benchmarked with a padding mask")


def sdpa_backend(name: str, member: str | None, call=None, description: str = "") -> Backend:
    """SDPA pinned to ``SDPBackend.<member>`` (None: torch's choice); also the Q-Former's."""
    gpu = member in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION")

    def why_not(device):
        from torch.nn.attention import SDPBackend

        if member and not hasattr(SDPBackend, member):
            return f"SDPBackend.{member} does not exist in torch {torch.__version__}"
        return f"SDPBackend.{member} is CUDA-only" if gpu and getattr(device, "type", device) != "cuda" else None

    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, member)])

    call = call or (lambda s: partial(F.scaled_dot_product_attention, is_causal=s.causal, scale=s.scale))
    return Backend(name, description or f"F.scaled_dot_product_attention in sdpa_kernel(SDPBackend.{member})",
                   call, why_not, context if member else Backend.context, gpu_kernel=gpu,
                   score_bytes=4 if member == "MATH" else None)  # math upcasts to fp32 and holds L×L


def _eager(s: AttnShape):
    from mmkernels.reference.attention import attention

    return partial(attention, is_causal=s.causal, scale=s.scale)


def _triton(s: AttnShape, **kw):
    import mmkernels

    return partial(mmkernels.attention, is_causal=s.causal, scale=s.scale, **kw)


#: fp8 (e4m3) forward: inference only, and its error is Q/K's 3-bit mantissa (docs/fp8.md: cosine
#: 0.9987 on random inputs, a relative error of ~0.05, ~30x bf16's), so its own output bound: 0.1 on a
#: GPU; 0.25 under TRITON_INTERPRET=1, whose own fp32 -> e4m3 cast is wrong (~0.15: docs/fp8.md; the
#: tests install the GPU's rounding, the benchmark does not)
FP8_FWD_ONLY = "fp8 attention is forward only (inference: docs/fp8.md)"
FP8_OUT_RTOL, FP8_OUT_RTOL_INTERPRETER = 0.1, 0.25


def fp8_out_rtol() -> float:
    from mmkernels._utils import interpreting

    return FP8_OUT_RTOL_INTERPRETER if interpreting() else FP8_OUT_RTOL


class _Padded(torch.autograd.Function):
    """The Triton launchers with ``split=False``: the head dim padded to a power of two."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        from mmkernels.kernels.attention import attention_forward

        out, lse = attention_forward(q, k, v, mask, None, 0.0, causal, scale, split=False)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from mmkernels.kernels.attention import attention_backward

        q, k, v, out, lse, mask = ctx.saved_tensors
        grads = attention_backward(dout, q, k, v, out, lse, mask, None, 0.0, ctx.causal, ctx.scale, split=False)
        return (*grads, None, None, None)


def _triton_pad(s: AttnShape):
    if s.d & (s.d - 1) == 0:
        raise Skip(f"d={s.d} is a power of two: nothing to split, the same kernel as triton")
    return lambda q, k, v, attn_mask=None: _Padded.apply(q, k, v, attn_mask, s.causal, s.scale)


class _Flex:
    """One static ``torch.compile`` of flex_attention per shape (fair timings), causal block masks cached."""

    def __init__(self):
        self.compiled, self.masks = None, {}

    def __call__(self, s: AttnShape):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        _no_mask(s, "flex")
        if self.compiled is None:
            import torch._dynamo.config as dcfg

            # past the default recompile limit of 8 dynamo would silently run unfused eager flex
            dcfg.recompile_limit = dcfg.accumulated_recompile_limit = 4096
            self.compiled = torch.compile(flex_attention, dynamic=False)
        if s.causal and (s.Lq, s.Lk) not in self.masks:
            self.masks = {(s.Lq, s.Lk): create_block_mask(lambda b, h, q, kv: q >= kv, None, None, s.Lq, s.Lk)}
        return partial(self.compiled, block_mask=self.masks.get((s.Lq, s.Lk)) if s.causal else None, scale=s.scale)


def _flex_why_not(device):
    if getattr(device, "type", device) != "cuda" and not os.environ.get("MMK_BENCH_FLEX_CPU"):
        return "FlexAttention is benchmarked on CUDA only (its CPU path compiles for tens of seconds per shape)"
    return None


def _importable(module: str, what: str):
    def why_not(device):
        if getattr(device, "type", device) != "cuda":
            return f"{what} is benchmarked on CUDA only"
        try:
            __import__(module)
        except Exception as exc:
            return f"{module} not importable: {type(exc).__name__}: {str(exc)[:200]}"
        return None

    return why_not


def _flash_attn(s: AttnShape):
    from flash_attn import flash_attn_func

    _no_mask(s, "flash_attn_func (the varlen API takes padding)")
    return partial(flash_attn_func, causal=s.causal, softmax_scale=s.scale)


def _xformers(s: AttnShape):
    import xformers.ops as xops

    _no_mask(s, "xformers")
    if s.causal and s.Lq != s.Lk:
        raise Skip("xformers' LowerTriangularMask is bottom-right aligned for Lq != Lk; SDPA's is top-left")
    bias = xops.LowerTriangularMask() if s.causal else None
    return lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=s.scale)


def _ref(q, k, v, s: AttnShape, mask, rows: int):
    """float64 attention of the slice, chunked over query rows (bounded memory)."""
    from mmkernels.reference.attention import attention

    outs = []
    for i in range(0, s.Lq, rows):
        m = mask
        if s.causal:  # top-left aligned, as SDPA: row r sees keys 0..r
            c = torch.arange(i, min(i + rows, s.Lq), device=q.device)[:, None] >= torch.arange(s.Lk, device=q.device)
            m = c if m is None else m & c
        outs.append(attention(q[:, :, i:i + rows], k, v, attn_mask=m, scale=s.scale))
    return torch.cat(outs, dim=2)


_SHAPE_KEYS = {"B": int, "H": int, "Lq": int, "Lk": int, "L": int, "d": int, "dv": int, "causal": as_bool, "mask": str}


class AttentionBench(OpBench):
    name = "attention"
    title = "mmkernels.attention (scaled-dot-product attention)"
    api = "attention"
    convention = CONVENTION
    presets = PRESETS
    opt_in = {"sdpa": "torch's own choice among the sdpa-* backends",
              "triton-pad": "the triton kernels with the head dim padded, not split (the split's gain)",
              "triton-fp8": 'mmkernels.attention(..., fp8="dynamic"): e4m3 forward (sm_89+), forward only'}
    grad_checked = ("q", "k", "v")

    def preset_specs(self, preset, *, cpu, quick):
        if preset != "sweep":
            return super().preset_specs(preset, cpu=cpu, quick=quick)
        Ls = (64, 128, 256) if cpu else (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
        tokens, hidden, ds = (512, 128, (64, 88)) if cpu else (16384, 2048, (64, 128, 88))
        # 2048 is no multiple of 88: d = 88 runs with H = 23 (H·d = 2024)
        return [ShapeSpec("sweep", f"d{d}-L{L}" + ("-causal" if c else ""), f"B·L = {tokens}, H·d ~ {hidden}",
                          AttnShape(max(1, tokens // L), max(1, hidden // d), L, L, d, causal=c), cpu_sized=cpu)
                for d in ds for c in (False, True) for L in Ls]

    def parse_shape(self, text):
        kv = parse_kv(text, _SHAPE_KEYS)
        if "L" in kv:
            kv.setdefault("Lq", kv["L"])
            kv.setdefault("Lk", kv.pop("L"))
        missing = [k for k in ("B", "H", "Lq", "Lk", "d") if k not in kv]
        if missing:
            raise ValueError(f"--shape {text!r}: missing {', '.join(missing)} (e.g. B=16,H=16,L=577,d=64)")
        if kv.get("mask") not in (None, "pad", "none"):
            raise ValueError(f"--shape {text!r}: mask must be 'pad' or 'none'")
        shape = AttnShape(**{**kv, "mask": kv.get("mask") if kv.get("mask") != "none" else None})
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s, quick):
        cap = 128 if quick else 512
        return replace(s, B=1 if quick else min(s.B, 2), H=min(s.H, 2 if quick else 4), Lq=min(s.Lq, cap),
                       Lk=min(s.Lk, cap))

    def describe(self, s):
        L = f"L={s.Lq}" if s.Lq == s.Lk else f"Lq={s.Lq} Lk={s.Lk}"
        return (f"B={s.B} H={s.H} {L} d={s.d}" + (f" dv={s.dv}" if s.dv not in (None, s.d) else "")
                + (" causal" if s.causal else "") + (f" mask={s.mask}" if s.mask else ""))

    def x(self, s):
        return s.Lk

    def backends(self):
        def triton_why_not(device):
            return mk_unavailable("attention", "triton", device)

        return {
            "eager": Backend("eager", "mmkernels.reference.attention: matmul + softmax + matmul in the input dtype",
                             _eager, score_bytes=1),
            "sdpa": sdpa_backend("sdpa", None, description="F.scaled_dot_product_attention, torch's choice"),
            **{f"sdpa-{n.split('_')[0].lower()}": sdpa_backend(f"sdpa-{n.split('_')[0].lower()}", n)
               for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")},
            "flex": Backend("flex", "torch.compile(flex_attention), causal as a block mask", _Flex(), _flex_why_not,
                            gpu_kernel=True),
            "flash-attn": Backend("flash-attn", "flash_attn.flash_attn_func on (B, L, H, D)", _flash_attn,
                                  _importable("flash_attn", "flash-attn"), gpu_kernel=True, layout="blhd"),
            "xformers": Backend("xformers", "xformers.ops.memory_efficient_attention on (B, L, H, D)", _xformers,
                                _importable("xformers.ops", "xformers"), gpu_kernel=True, layout="blhd"),
            "triton": mk_backend("attention", "triton", _triton, 'mmkernels.attention(..., backend="triton")'),
            "triton-fp8": replace(mk_backend("attention", "triton", partial(_triton, fp8="dynamic"),
                                             'mmkernels.attention(..., fp8="dynamic", backend="triton"): e4m3 Q, K, '
                                             "V quantised per (batch, head), fp8 tensor cores (sm_89+)"),
                                  name="triton-fp8", fwd_only=FP8_FWD_ONLY, out_rtol=fp8_out_rtol()),
            "triton-pad": Backend("triton-pad", "the triton kernels with the head dim padded to a power of two",
                                  _triton_pad, triton_why_not, gpu_kernel=True),
        }

    def make_inputs(self, s, dtype, device, generator):
        def rnd(*shape):
            return torch.randn(shape, generator=generator, device=device).to(dtype)

        inp = {"q": rnd(s.B, s.H, s.Lq, s.d), "k": rnd(s.B, s.H, s.Lk, s.d), "v": rnd(s.B, s.H, s.Lk, s.Dv),
               "dout": rnd(s.B, s.H, s.Lq, s.Dv)}
        if s.mask == "pad":
            keep = s.Lk - (torch.arange(s.B, device=device) % 4) * max(1, s.Lk // 8)
            inp["mask"] = (torch.arange(s.Lk, device=device)[None, :] < keep[:, None]).view(s.B, 1, 1, s.Lk)
        return inp

    def bind(self, backend, s, inputs, grad):
        call, blhd = backend.call(s), backend.layout == "blhd"

        def layout(t):
            return t.transpose(1, 2).contiguous() if blhd else t

        leaves = {n: layout(inputs[n]).detach().requires_grad_(grad) for n in ("q", "k", "v")}
        mask = {"attn_mask": inputs["mask"]} if "mask" in inputs else {}
        return Bound(lambda: call(*leaves.values(), **mask), leaves if grad else {},
                     layout(inputs["dout"]) if grad else None, (lambda t: t.transpose(1, 2)) if blhd else (lambda t: t))

    def reference(self, s, inputs, grad=False):
        nh = min(CHECK_HEADS, s.H)
        q, k, v, dout = (inputs[n][0:1, :nh].double() for n in ("q", "k", "v", "dout"))
        mask = inputs["mask"][0:1] if "mask" in inputs else None
        if not grad or nh * s.Lq * s.Lk > GRAD_CHECK_MAX:
            with torch.no_grad():
                return _ref(q, k, v, s, mask, max(1, (256 * MIB) // (nh * s.Lk * 8)))[0], {}
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out = _ref(*leaves, s, mask, s.Lq)
        out.backward(dout)
        return out.detach()[0], {n: t.grad[0] for n, t in zip("qkv", leaves)}

    def ref_slice(self, t):
        return t[0, :CHECK_HEADS]

    def memory_guard(self, backend, s, itemsize, mode, device):
        if not backend.score_bytes:
            return None
        # eager and math hold ~3 B·H·Lq·Lk tensors at the forward's peak and ~6 with autograd
        # (measured on the reference: scores, shifted, exp, probs)
        factor, nbytes = (3 if mode == "fwd" else 6), max(backend.score_bytes, itemsize)
        need = factor * s.B * s.H * s.Lq * s.Lk * nbytes
        if getattr(device, "type", device) == "cuda":
            free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            limit = min(20 * GIB, 0.85 * (free - torch.cuda.memory_allocated(device)))
        else:
            limit = 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > limit:
            return (f"needs ~{need / GIB:.1f} GiB for the Lq×Lk scores ({factor} × B·H·Lq·Lk × {nbytes} B) "
                    f"> {limit / GIB:.1f} GiB available")
        return None

    def flops(self, s, mode):
        return attention_flops(s.B, s.H, s.Lq, s.Lk, s.d, s.Dv, causal=s.causal, mode=mode)

    def bytes(self, s, itemsize, mode):
        """q, k, v read once and o written once (fwd); bwd reads q, k, v, o, do and writes dq, dk, dv."""
        q, k, v, o = s.B * s.H * s.Lq * s.d, s.B * s.H * s.Lk * s.d, s.B * s.H * s.Lk * s.Dv, s.B * s.H * s.Lq * s.Dv
        fwd, bwd = q + k + v + o, 2 * (q + k + v) + 2 * o
        return float(itemsize * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


BENCH = AttentionBench()
