"""Benchmark cases of ``mmkernels.qformer_cross_attention``: the BLIP-2 / InstructBLIP Q-Former's
cross-attention, in float32 as HF keeps it. Backends: ``eager`` (HF's eager chain: three
``F.linear``, matmul, softmax, matmul; K and V through memory), ``sdpa`` (HF's sdpa path; also
pinned: ``sdpa-flash`` ...), ``mk-attention`` (the Linears + ``mmkernels.attention``: the unfused
mmkernels route), ``triton`` (the fused kernel: K/V projected in-kernel, never in memory).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .cases import Backend, Bound, OpBench, ShapeSpec, mk_backend, mk_unavailable, parse_kv
from .cases_attention import attention_flops, sdpa_backend

__all__ = ["BENCH", "QFormerShape", "hf_eager"]

CONVENTION = ("projections 2*B*Lq*Dq*Dq + 4*B*Lk*Dk*Dq plus attention 4*B*Lq*Lk*Dq; "
              "bwd = 2 * projections + 2.5 * attention; fwd+bwd = the sum")


@dataclass(frozen=True)
class QFormerShape:
    """B × Lq queries of width Dq attending to B × Lk image features of width Dk, H heads (d = Dq / H)."""

    B: int
    Lq: int
    Lk: int
    Dq: int
    Dk: int
    H: int


_NO_QFORMER = "{} has no Q-Former (an MLP projector / pooling connects its vision tower to the LLM)"
_BLIP = dict(Lq=32, Lk=257, Dq=768, Dk=1408, H=12)  # EVA ViT-g/14: 257 tokens of 1408; Q-Former 768 = 12 x 64
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "blip2": [ShapeSpec("blip2", f"cross-b{b}", f"BLIP-2 Q-Former cross-attn, batch {b}{why} (fp32, as HF keeps it)",
                        QFormerShape(B=b, **_BLIP), "float32")
              for b, why in ((32, ""), (64, ""), (256, ", a training batch"))],
    "instructblip": [ShapeSpec("instructblip", "cross-b32", "InstructBLIP Q-Former cross-attn (the 32 queries; the "
                               "instruction tokens skip cross-attn), batch 32, fp32", QFormerShape(B=32, **_BLIP),
                               "float32")],
    **{p: _NO_QFORMER.format(m) for p, m in (("llava15", "LLaVA-1.5"), ("llava-ov", "LLaVA-OneVision"),
                                             ("gemma3", "Gemma 3"), ("qwen2vl", "Qwen2-VL"), ("qwen25vl", "Qwen2.5-VL"),
                                             ("internvl", "InternVL"))},
}
_ARGS = ("hidden", "enc", "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias")


def _project(hidden, enc, qw, qb, kw, kb, vw, vb, num_heads):
    """Q, K, V as (B, H, L, d), as HF's Q-Former computes them (K and V materialised)."""
    def heads(t):
        return t.view(t.shape[0], t.shape[1], num_heads, -1).transpose(1, 2)

    return heads(F.linear(hidden, qw, qb)), heads(F.linear(enc, kw, kb)), heads(F.linear(enc, vw, vb))


def _merge(out):
    return out.transpose(1, 2).flatten(2)


def hf_eager(*args):
    """HF's eager Q-Former cross-attention up to the context layer (before the output dense)."""
    q, k, v = _project(*args)
    return _merge(torch.matmul((torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1), v))


def hf_sdpa(*args):
    return _merge(F.scaled_dot_product_attention(*_project(*args)))


def _mk_attention(*args):
    import mmkernels

    return _merge(mmkernels.attention(*_project(*args), backend="triton"))


def _fused(*args):
    import mmkernels

    return mmkernels.qformer_cross_attention(*args)


def _why_not_triton(device):
    return mk_unavailable("qformer_cross_attention", "triton", device)


@contextlib.contextmanager
def _path(rule: int):
    """Triton forced, with the fused/hoisted rule pinned (``HOIST_MIN_BATCH``: 0 always hoisted,
    a huge value always fused), so both paths are timed side by side and can overrule the rule."""
    import importlib

    import mmkernels

    ops_qformer = importlib.import_module("mmkernels.ops.qformer_cross_attention")  # (the package attribute: the op)

    saved = ops_qformer.HOIST_MIN_BATCH
    ops_qformer.HOIST_MIN_BATCH = rule
    try:
        with mmkernels.use_backend("triton"):
            yield
    finally:
        ops_qformer.HOIST_MIN_BATCH = saved


class QFormerBench(OpBench):
    name = "qformer_cross_attention"
    title = "mmkernels.qformer_cross_attention (Q-Former cross-attention, K/V projected in-kernel)"
    api = "qformer_cross_attention"
    convention = CONVENTION
    presets = PRESETS
    grad_checked = ("hidden", "enc")

    def parse_shape(self, text):
        kv = parse_kv(text, {k: int for k in ("B", "Lq", "Lk", "Dq", "Dk", "H")})
        shape = QFormerShape(**{"B": 32, **_BLIP, **kv})
        if shape.Dq % shape.H:
            raise ValueError(f"--shape {text!r}: Dq={shape.Dq} is not a multiple of H={shape.H}")
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s, quick):
        # widths cut with the head dim kept (768 = 12 x 64 -> 4 x 64): seconds on two cores
        if quick and s.Dq > 256 and s.Dq % s.H == 0 and 256 % (s.Dq // s.H) == 0:
            return replace(s, B=1, Dq=256, Dk=min(s.Dk, 352), H=256 // (s.Dq // s.H))
        return replace(s, B=1 if quick else min(s.B, 4))

    def describe(self, s):
        return f"B={s.B} Lq={s.Lq} Lk={s.Lk} Dq={s.Dq} Dk={s.Dk} H={s.H}"

    def x(self, s):
        return s.Lk

    def backends(self):
        def sdpa(name, member):
            return sdpa_backend(name, member, lambda s: hf_sdpa, f"3 x F.linear + SDPA in sdpa_kernel({member})")

        return {
            "eager": Backend("eager", "HF eager: 3 x F.linear, matmul, softmax, matmul", lambda s: hf_eager),
            "sdpa": sdpa("sdpa", None),
            **{f"sdpa-{m.split('_')[0].lower()}": sdpa(f"sdpa-{m.split('_')[0].lower()}", m)
               for m in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")},
            "mk-attention": Backend("mk-attention", "3 x F.linear + mmkernels.attention (Triton)",
                                    lambda s: _mk_attention, lambda d: mk_unavailable("attention", "triton", d),
                                    gpu_kernel=True),
            "triton": mk_backend("qformer_cross_attention", "triton", lambda s: _fused,
                                 "mmkernels.qformer_cross_attention, Triton (the dispatcher's path rule)"),
            "triton-fused": Backend("triton-fused", "Triton, fused path: K/V projected inside the kernel",
                                    lambda s: _fused, _why_not_triton, lambda: _path(10**9), gpu_kernel=True),
            "triton-hoisted": Backend("triton-hoisted", "Triton, hoisted path: 3 cuBLAS GEMMs + attention kernels",
                                      lambda s: _fused, _why_not_triton, lambda: _path(0), gpu_kernel=True),
        }

    def make_inputs(self, s, dtype, device, generator):
        def rnd(*shape, scale=1.0):
            return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)

        # weights scaled like a trained Linear (std ~ fan_in^-1/2) so scores stay O(1)
        return {"hidden": rnd(s.B, s.Lq, s.Dq), "enc": rnd(s.B, s.Lk, s.Dk),
                "q_weight": rnd(s.Dq, s.Dq, scale=s.Dq ** -0.5), "q_bias": rnd(s.Dq, scale=0.02),
                "k_weight": rnd(s.Dq, s.Dk, scale=s.Dk ** -0.5), "k_bias": rnd(s.Dq, scale=0.02),
                "v_weight": rnd(s.Dq, s.Dk, scale=s.Dk ** -0.5), "v_bias": rnd(s.Dq, scale=0.02),
                "dout": rnd(s.B, s.Lq, s.Dq)}

    def bind(self, backend, s, inputs, grad):
        fn = backend.call(s)
        leaves = {n: inputs[n].detach().requires_grad_(grad) for n in _ARGS}
        return Bound(lambda: fn(*leaves.values(), s.H), leaves if grad else {}, inputs["dout"] if grad else None)

    def reference(self, s, inputs, grad=False):
        """``mmkernels.reference.qformer_cross_attention`` in float64 on batch element 0 (hidden's and
        enc's gradients)."""
        from mmkernels.reference.qformer_cross_attention import qformer_cross_attention as ref

        args = {n: inputs[n][0:1].double() if n in ("hidden", "enc") else inputs[n].double() for n in _ARGS}
        for n in self.grad_checked:
            args[n].requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = ref(*args.values(), s.H)
        if grad:
            out.backward(inputs["dout"][0:1].double())
        return out.detach()[0], {n: args[n].grad[0] for n in self.grad_checked} if grad else {}

    def flops(self, s, mode):
        proj = 2.0 * s.B * s.Lq * s.Dq * s.Dq + 4.0 * s.B * s.Lk * s.Dk * s.Dq
        attn = attention_flops(s.B, s.H, s.Lq, s.Lk, s.Dq // s.H)
        return {"fwd": proj + attn, "bwd": 2 * proj + 2.5 * attn, "fwd+bwd": 3 * proj + 3.5 * attn}[mode]

    def bytes(self, s, itemsize, mode):
        """The inputs and weights read once, the context written once (K and V never reach memory
        in a fused kernel); bwd: the mirror image plus dout."""
        weights = s.Dq * s.Dq + 2 * s.Dq * s.Dk + 3 * s.Dq
        fwd = 2 * s.B * s.Lq * s.Dq + s.B * s.Lk * s.Dk + weights
        bwd = fwd + s.B * s.Lq * s.Dq + s.B * s.Lk * s.Dk + weights
        return float(itemsize * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


BENCH = QFormerBench()
