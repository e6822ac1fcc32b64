"""Benchmark cases of token pruning's scoring layer: one causal LLM attention layer that must also
say how much attention each key receives from the last query (FastV's rule), at LLaVA-1.5's
(LLaMA-7B heads 32 x 128, 576 image + 64 text tokens) and LLaVA-OneVision's (Qwen2-7B heads
28 query / 4 key-value x 128, 4 and 9 images x 729 + 64 text tokens: ~3k and ~6.6k) sizes.

Backends: ``eager`` (the baseline: what HF's eager attention does with ``output_attentions=True`` —
repeat_kv, softmax(QKᵀ) as a (B, H, L, L) float32 tensor, times V, its last row averaged over heads);
``sdpa+scores`` (SDPA for the output, ``mmkernels.attention_scores`` for the scores, the dispatcher's
choice); ``mk`` (``mmkernels.attention(..., return_scores=dict(query_index=-1))``, the dispatcher's
choice: its CPU backends on a CPU); ``triton`` (the same, forced to the Triton kernels). The checked
output is the (B, L) score vector; peak memory (CUDA) is the runner's ``peak``/``extra`` columns —
eager's L×L weights against the fused path's O(L).

FLOPs: the attention's, causal: 2·B·H·L²·2d / 2 (the score row's 2·H·L·d is not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .cases import Backend, Bound, OpBench, ShapeSpec, Skip, mk_backend, parse_kv
from .cases_attention import attention_flops

__all__ = ["BENCH", "ScoreShape"]


@dataclass(frozen=True)
class ScoreShape:
    """(B, Hq, L, d) queries against (B, Hkv, L, d) keys/values, causal; scores of the last query's row."""

    B: int
    Hq: int
    Hkv: int
    L: int
    d: int = 128


def _llava(images: int, side: int, text: int = 64) -> int:
    return images * side * side + text


PRESETS: dict[str, list[ShapeSpec] | str] = {
    "llava15": [ShapeSpec("llava15", "llama7b-640", "LLaVA-1.5 (LLaMA-7B, 32 heads x 128): 576 image + 64 text tokens",
                          ScoreShape(1, 32, 32, _llava(1, 24), 128))],
    "llava-ov": [ShapeSpec("llava-ov", "qwen2-7b-4img", "LLaVA-OneVision (Qwen2-7B, 28/4 heads x 128): 4 images x 729 "
                           "+ 64 text tokens", ScoreShape(1, 28, 4, _llava(4, 27), 128)),
                 ShapeSpec("llava-ov", "qwen2-7b-9img", "LLaVA-OneVision (Qwen2-7B, 28/4 heads x 128): 9 images x 729 "
                           "+ 64 text tokens", ScoreShape(1, 28, 4, _llava(9, 27), 128))],
    **{m: f"{m}: token pruning is benchmarked at the LLaVA-1.5 and LLaVA-OneVision sizes (--preset llava15, llava-ov;"
          " --shape for others)" for m in ("blip2", "instructblip", "gemma3", "qwen2vl", "qwen25vl", "internvl")},
}


def _eager(s: ScoreShape):
    def fn(q, k, v):
        rep = s.Hq // s.Hkv
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # HF eager's repeat_kv
        w = (q @ kk.transpose(-2, -1)) / math.sqrt(s.d)
        causal = torch.ones(s.L, s.L, dtype=torch.bool, device=q.device).tril()
        w = torch.softmax(w.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
        out = w @ vv  # the layer's output: output_attentions computes it as well
        del out  # computed (the layer's output) and timed; the check reads the scores
        return w[:, :, -1].float().mean(1)
    return fn


def _sdpa_scores(s: ScoreShape):
    import mmkernels

    def fn(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        scores = mmkernels.attention_scores(q, k, query_index=-1, is_causal=True, enable_gqa=True)
        del out  # computed (the layer's output) and timed; the check reads the scores
        return scores
    return fn


def _mk(s: ScoreShape):
    import mmkernels

    def fn(q, k, v):
        out, scores = mmkernels.attention(q, k, v, is_causal=True, enable_gqa=True, return_scores=dict(query_index=-1))
        del out  # computed (the layer's output) and timed; the check reads the scores
        return scores
    return fn


class PruneBench(OpBench):
    name = "prune"
    title = "token-pruning scoring layer: eager output_attentions vs mmkernels.attention(return_scores=...)"
    api = "attention_scores"
    metric = "tflops"
    convention = ("the layer's causal attention: 2*B*Hq*L*L*2d / 2 (QK^T and PV); the score row, softmax and the "
                  "head mean not counted")
    presets = PRESETS
    default_modes = ("fwd",)
    suite_backends = {"cpu": ("eager", "mk"), "cuda": ("eager", "sdpa+scores", "mk", "triton")}
    suite_modes = {"cpu": ("fwd",), "cuda": ("fwd",)}

    def parse_shape(self, text):
        kv = parse_kv(text, {"B": int, "Hq": int, "Hkv": int, "L": int, "d": int}, aliases={"H": "Hq"})
        kv.setdefault("Hkv", kv.get("Hq", 0))
        missing = [k for k in ("B", "Hq", "L") if k not in kv]
        if missing:
            raise ValueError(f"--shape {text!r}: missing {', '.join(missing)} (e.g. B=1,Hq=28,Hkv=4,L=2980,d=128)")
        if kv["Hkv"] < 1 or kv["Hq"] % kv["Hkv"]:
            raise ValueError(f"--shape {text!r}: Hq must be a multiple of Hkv")
        shape = ScoreShape(**kv)
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s, quick):
        rep = s.Hq // s.Hkv
        hkv = max(1, min(s.Hkv, (4 if quick else 8) // rep))
        L = min(s.L, max(97, s.L // 32) if quick else max(577, s.L // 8))
        return replace(s, B=1, Hq=hkv * rep, Hkv=hkv, L=L, d=min(s.d, 64 if quick else 128))

    def describe(self, s):
        return f"B={s.B} Hq={s.Hq} Hkv={s.Hkv} L={s.L} d={s.d} causal"

    def x(self, s):
        return s.L

    def backends(self):
        return {
            "eager": Backend("eager", "HF eager attention with output_attentions=True: (B,H,L,L) fp32 softmax, "
                             "times V, last row averaged over heads", _eager, score_bytes=4),
            "sdpa+scores": Backend("sdpa+scores", "SDPA for the output + mmkernels.attention_scores for the scores",
                                   _sdpa_scores),
            "mk": Backend("mk", "mmkernels.attention(..., return_scores=dict(query_index=-1)), dispatcher's choice",
                          _mk),
            "triton": mk_backend("attention_scores", "triton", _mk,
                                 'mmkernels.attention(..., return_scores=...) forced to backend="triton"'),
        }

    def make_inputs(self, s, dtype, device, generator):
        def rnd(*shape):
            return torch.randn(shape, generator=generator, device=device).to(dtype)

        return {"q": rnd(s.B, s.Hq, s.L, s.d), "k": rnd(s.B, s.Hkv, s.L, s.d), "v": rnd(s.B, s.Hkv, s.L, s.d)}

    def bind(self, backend, s, inputs, grad):
        if grad:
            raise Skip("the scoring layer is inference-only (pruning decides at prefill): --mode fwd")
        fn = backend.call(s)
        q, k, v = (inputs[n] for n in ("q", "k", "v"))
        return Bound(lambda: fn(q, k, v))

    def reference(self, s, inputs, grad=False):
        """Batch 0's score vector in float64: the last query's causal softmax row, averaged over heads."""
        q = inputs["q"][0, :, -1].double()  # (Hq, d)
        k = inputs["k"][0].double().repeat_interleave(s.Hq // s.Hkv, 0)  # (Hq, L, d)
        return torch.einsum("hd,hld->hl", q, k).div(math.sqrt(s.d)).softmax(-1).mean(0), {}

    def memory_guard(self, backend, s, itemsize, mode, device):
        if backend.score_bytes and getattr(device, "type", device) == "cuda":
            need = 3 * s.B * s.Hq * s.L * s.L * max(backend.score_bytes, itemsize)
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.85 * free:
                return f"needs ~{need / 2**30:.1f} GiB for the L×L weights > {free / 2**30:.1f} GiB free"
        return None

    def flops(self, s, mode):
        return attention_flops(s.B, s.Hq, s.L, s.L, s.d, causal=True)


BENCH = PruneBench()
