"""Benchmark cases of a whole BLIP-2 Q-Former (``transformers.Blip2QFormerModel``: 12 layers, cross-
attention every 2nd, fp32 as HF keeps it) on the image features: HF ``eager`` / ``sdpa`` against the
model patched by ``mmkernels.patch`` — per layer (each cross-attention projects its own K/V, or the
fused kernel never writes them) or with the K/V of all 6 cross-attention layers from ONE GEMM per
forward (:class:`mmkernels.nn.QFormerSharedKV`).  These rows are what sets
``mmkernels.ops.qformer_cross_attention.SHARED_KV_MIN_BATCH`` / ``HOIST_MIN_BATCH`` on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch

from .cases import Backend, Bound, OpBench, ShapeSpec, mk_unavailable, parse_kv

__all__ = ["BENCH", "QFormerModelShape"]

CONVENTION = ("fwd: every GEMM 2*M*N*K (self-attn Q,K,V,O and FFN per layer; cross-attn Q,O on the queries, "
              "K,V on the image per cross layer) plus attention 4*B*Lq*Lk*Dq per attention; bwd = 2 * fwd; "
              "fwd+bwd = 3 * fwd")


@dataclass(frozen=True)
class QFormerModelShape:
    """B × Lq queries of width Dq, B × Lk image features of width Dk, H heads, ``layers`` layers with
    cross-attention every ``freq``-th, FFN width I."""

    B: int
    Lq: int
    Lk: int
    Dq: int
    Dk: int
    H: int
    layers: int
    freq: int
    I: int  # noqa: E741 (the config's intermediate_size)

    @property
    def n_cross(self) -> int:
        return len(range(0, self.layers, self.freq))


_BLIP = dict(Lq=32, Lk=257, Dq=768, Dk=1408, H=12, layers=12, freq=2, I=3072)
_NO_QFORMER = "{} has no Q-Former (an MLP projector / pooling connects its vision tower to the LLM)"
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "blip2": [ShapeSpec("blip2", f"qformer-b{b}", f"BLIP-2 Q-Former (12 layers, 6 cross), batch {b} (fp32, as HF "
                        "keeps it)", QFormerModelShape(B=b, **_BLIP), "float32") for b in (8, 32, 64)],
    "instructblip": "the same Q-Former as blip2 for the 32 queries (the instruction tokens skip cross-attention, "
                    "where the shared K/V act): see --preset blip2",
    **{p: _NO_QFORMER.format(m) for p, m in (("llava15", "LLaVA-1.5"), ("llava-ov", "LLaVA-OneVision"),
                                             ("gemma3", "Gemma 3"), ("qwen2vl", "Qwen2-VL"), ("qwen25vl", "Qwen2.5-VL"),
                                             ("internvl", "InternVL"))},
}


@dataclass(frozen=True)
class _Variant:
    """Which model a backend runs: HF's (``attn`` eager/sdpa) or the patched copy (``shared``: the
    QFormerSharedKV mode, None = the rule)."""

    patched: bool
    attn: str = "eager"
    shared: bool | None = None


@contextlib.contextmanager
def _triton_rule(hoist_min_batch: int):
    from .cases_qformer_cross_attention import _path

    with _path(hoist_min_batch):
        yield


def _transformers_missing() -> str | None:
    try:
        import transformers

        transformers.Blip2QFormerModel  # noqa: B018
    except (ImportError, AttributeError) as exc:
        return f"needs transformers with Blip2QFormerModel ({type(exc).__name__}: {exc})"
    return None


class QFormerModelBench(OpBench):
    name = "qformer_model"
    title = "BLIP-2 Q-Former, whole model: HF eager/sdpa vs mmkernels.patch per-layer vs shared K/V GEMM"
    api = "patch"
    convention = CONVENTION
    presets = PRESETS
    grad_checked = ("query", "enc")
    suite_backends = {"cpu": ("eager", "sdpa", "mk-shared"),
                      "cuda": ("eager", "sdpa", "mk-fused", "mk-hoisted", "mk-shared")}

    def __init__(self):
        self._models: dict = {}  # (shape, dtype, device) -> {"hf": model, "mk": patched copy}

    def unavailable(self) -> str | None:
        return super().unavailable() or _transformers_missing()

    def parse_shape(self, text):
        kv = parse_kv(text, {k: int for k in ("B", "Lq", "Lk", "Dq", "Dk", "H", "layers", "freq", "I")})
        shape = QFormerModelShape(**{"B": 32, **_BLIP, **kv})
        if shape.Dq % shape.H:
            raise ValueError(f"--shape {text!r}: Dq={shape.Dq} is not a multiple of H={shape.H}")
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape, "float32")

    def scale_for_cpu(self, s, quick):
        if quick:  # head dim 64 kept, 4 layers (2 cross): seconds on two cores
            return replace(s, B=1, Dq=128, H=2, Dk=176, layers=4, I=256)
        return replace(s, B=min(s.B, 4))

    def describe(self, s):
        return f"B={s.B} Lq={s.Lq} Lk={s.Lk} Dq={s.Dq} Dk={s.Dk} H={s.H} layers={s.layers} freq={s.freq} I={s.I}"

    def x(self, s):
        return s.B

    def backends(self):
        def mk(name, desc, shared, context=None, why_not=lambda d: None):
            # the auto rows run what the dispatcher picks (SDPA on a CPU); the pinned ones are Triton
            return Backend(name, desc, _Variant(True, shared=shared), why_not, context or contextlib.nullcontext,
                           gpu_kernel=context is not None)

        def why_not_triton(device):
            return mk_unavailable("qformer_cross_attention", "triton", device)

        return {
            "eager": Backend("eager", "HF Blip2QFormerModel, attn_implementation='eager'", _Variant(False, "eager")),
            "sdpa": Backend("sdpa", "HF Blip2QFormerModel, attn_implementation='sdpa'", _Variant(False, "sdpa")),
            "mk": mk("mk", "mmkernels.patch, the dispatcher's rules (shares_kv, triton_path)", None),
            "mk-per-layer": mk("mk-per-layer", "mmkernels.patch(qformer_shared_kv=False): each cross layer its own "
                               "K/V (auto backend)", False),
            "mk-shared": mk("mk-shared", "mmkernels.patch(qformer_shared_kv=True): K/V of every cross layer in one "
                            "GEMM, then mk.attention (auto backend)", True),
            "mk-fused": mk("mk-fused", "patched, per layer, Triton fused path (K/V projected in-kernel)", False,
                           lambda: _triton_rule(10**9), why_not_triton),
            "mk-hoisted": mk("mk-hoisted", "patched, per layer, Triton hoisted path (3 cuBLAS GEMMs + attention)",
                             False, lambda: _triton_rule(0), why_not_triton),
            "mk-shared-triton": mk("mk-shared-triton", "patched, shared K/V GEMM + the Triton attention kernel", True,
                                   lambda: _triton_rule(0), why_not_triton),
        }

    def _models_for(self, s, dtype, device):
        key = (s, dtype, str(device))
        if key not in self._models:
            import transformers

            import mmkernels

            self._models.clear()  # one shape's models at a time
            cfg = transformers.Blip2QFormerConfig(
                hidden_size=s.Dq, num_attention_heads=s.H, num_hidden_layers=s.layers, intermediate_size=s.I,
                encoder_hidden_size=s.Dk, cross_attention_frequency=s.freq, attention_probs_dropout_prob=0.0,
                hidden_dropout_prob=0.0)
            cfg._attn_implementation = "eager"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                hf = transformers.Blip2QFormerModel(cfg)
            hf = hf.to(device=device, dtype=dtype).eval()
            patched = copy.deepcopy(hf)
            mmkernels.patch(patched)
            self._models[key] = {"hf": hf, "mk": patched}
        return self._models[key]

    def make_inputs(self, s, dtype, device, generator):
        def rnd(*shape):
            return torch.randn(shape, generator=generator, device=device).to(dtype)

        return {"query": rnd(s.B, s.Lq, s.Dq), "enc": rnd(s.B, s.Lk, s.Dk), "dout": rnd(s.B, s.Lq, s.Dq)}

    def bind(self, backend, s, inputs, grad):
        v: _Variant = backend.call
        models = self._models_for(s, inputs["query"].dtype, inputs["query"].device)
        if v.patched:
            model = models["mk"]
            model.encoder.mmkernels_shared_kv.mode = v.shared
        else:
            model = models["hf"]
            model.config._attn_implementation = v.attn
        leaves = {n: inputs[n].detach().requires_grad_(grad) for n in ("query", "enc")}
        for p in model.parameters():  # inference: no weight gradients (and the shared K/V weight cache)
            p.requires_grad_(grad)

        def fn():
            with torch.set_grad_enabled(grad):
                return model(query_embeds=leaves["query"], encoder_hidden_states=leaves["enc"]).last_hidden_state

        return Bound(fn, leaves if grad else {}, inputs["dout"] if grad else None)

    def reference(self, s, inputs, grad=False):
        """HF eager in float64 on batch element 0 (the queries' and image features' gradients)."""
        hf = self._models_for(s, inputs["query"].dtype, inputs["query"].device)["hf"]
        m64 = copy.deepcopy(hf).double()
        m64.config._attn_implementation = "eager"
        q, enc = (inputs[n][0:1].double().requires_grad_(grad) for n in ("query", "enc"))
        with torch.set_grad_enabled(grad):
            out = m64(query_embeds=q, encoder_hidden_states=enc).last_hidden_state
        if grad:
            out.backward(inputs["dout"][0:1].double())
        return out.detach()[0], {"query": q.grad[0], "enc": enc.grad[0]} if grad else {}

    def flops(self, s, mode):
        b, lq, lk, d, dk, ffn = s.B, s.Lq, s.Lk, s.Dq, s.Dk, s.I
        per_layer = 2.0 * b * lq * d * d * 4 + 4.0 * b * lq * lq * d + 2.0 * b * lq * d * ffn * 2
        cross = 2.0 * b * lq * d * d * 2 + 2.0 * b * lk * dk * d * 2 + 4.0 * b * lq * lk * d
        fwd = s.layers * per_layer + s.n_cross * cross
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


BENCH = QFormerModelBench()
