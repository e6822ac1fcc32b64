"""Benchmark cases of one training step of a Qwen2.5-VL-style model (``mmkernels bench train``):
vision tower + language model from transformers' own classes (``Qwen2_5_VLForConditionalGeneration``,
random weights from a config), a batch of multimodal samples of different lengths (text, one
image each, images of different sizes), one step = forward + backward + optimizer step.

Backends (what runs the step):

``hf-padded``        transformers as configured (sdpa), the samples padded to the longest: the baseline
``mk-padded``        ``mmkernels.patch(model)``, the same padded batch
``mk-packed``        patched + :func:`mmkernels.integrations.qwen_vl.enable_mrope_packing`: the samples
                     in ONE row (each from position 0), no padding; every LM layer one ``attention_varlen``
``mk-padded-sac`` /  the same with selective activation checkpointing of every vision block and decoder
``mk-packed-sac``    layer (transformers' ``activation_checkpointing_enable`` with
                     ``context_fn`` = ``mmkernels.ops.sac_policy()``: attention outputs kept, the rest
                     recomputed in the backward)

Rows: step time (ms p50), model TFLOP/s of the real tokens, peak memory (CUDA:
``torch.cuda.max_memory_allocated`` during one step: weights, optimizer state, gradients and
activations; not measured on a CPU), and in the notes tokens/s of real (non-padding) tokens.  The
check: the step's loss against a float64 (CUDA: float32) run of the unpatched model on the padded
batch.  The optimizer is AdamW with ``lr=0``: a real step's work, but the weights never change,
so every row checks against the one reference.

On a CPU (``--quick``: a tiny model) this is a smoke test: the patched backends run the dispatcher's
CPU route (SDPA), also under TRITON_INTERPRET=1 (the interpreter's seconds of Python per step time
nothing).  ``--preset qwen25vl``
on a GPU: Qwen2.5-VL-3B widths (vision 1280 x 16 heads, LM 2048 x 16 heads / 2 KV heads,
vocabulary 151936) at reduced depth (8 vision blocks, 4 LM layers), 8 samples of up to 2048 tokens.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace

import torch

from .cases import Backend, Bound, OpBench, ShapeSpec, parse_kv, rel_error

__all__ = ["BENCH", "TrainShape"]

CONVENTION = ("one step = optimizer step (AdamW, lr=0) + forward + backward; FLOPs: 6 * params * tokens for every "
              "Linear of the LM (and lm_head) over the real tokens and of the vision tower (patch embedding, blocks, "
              "merger) over the patches, plus "
              "attention 12 * D * sum L_i^2 / 2 (causal LM) and 12 * Dv * sum over windows / frames of len^2; "
              "padding not counted, SAC recompute not counted")


@dataclass(frozen=True)
class TrainShape:
    """``B`` samples of up to ``L`` tokens (lengths spread from L down to L/4), one image each of up to
    ``img`` x ``img`` patches of ``patch`` pixels (sides spread down to img/2); vision tower ``depth``
    blocks of width ``Dv``, ``Hv`` heads, MLP ``Iv``, windows of ``window`` pixels, full attention every
    ``F``-th block; LM ``layers`` layers of width ``D``, ``H`` heads / ``Hkv`` KV heads, MLP ``I``,
    vocabulary ``V``."""

    B: int
    L: int
    img: int
    Dv: int
    Hv: int
    depth: int
    Iv: int
    D: int
    H: int
    Hkv: int
    layers: int
    I: int  # noqa: E741 (the config's intermediate_size)
    V: int
    patch: int = 14
    window: int = 112
    F: int = 8

    def samples(self) -> list[tuple[int, int, int]]:
        """(tokens, image h, image w in patches) per sample: lengths L .. L/4, sides img .. img/2
        (even: the 2x2 patch merge), in a fixed order."""
        out = []
        for i in range(self.B):
            f = i / max(self.B - 1, 1)
            h = max(2, 2 * round(self.img / 2 * (1 - 0.5 * f)))
            w = max(2, 2 * round(self.img / 2 * (1 - 0.5 * ((i * 2 % self.B) / max(self.B - 1, 1)))))
            n = max(round(self.L * (1 - 0.75 * f)), h * w // 4 + 4)
            out.append((n, h, w))
        return out

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens per step."""
        return sum(n for n, _, _ in self.samples())

    @property
    def padded_tokens(self) -> int:
        return self.B * max(n for n, _, _ in self.samples())


_QWEN25VL_3B = dict(Dv=1280, Hv=16, Iv=3420, D=2048, H=16, Hkv=2, I=11008, V=151936, patch=14, window=112)
_OTHER = "a training step of Qwen2.5-VL's classes only (--preset qwen25vl): {} has no shape here"
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "qwen25vl": [ShapeSpec("qwen25vl", "3b-width-8x2048",
                           "Qwen2.5-VL-3B widths, 8 vision blocks + 4 LM layers, 8 samples <= 2048 tokens, "
                           "images <= 32x32 patches",
                           TrainShape(B=8, L=2048, img=32, depth=8, layers=4, F=4, **_QWEN25VL_3B))],
    **{p: _OTHER.format(m) for p, m in (("blip2", "BLIP-2"), ("instructblip", "InstructBLIP"),
                                        ("llava15", "LLaVA-1.5"), ("llava-ov", "LLaVA-OneVision"),
                                        ("gemma3", "Gemma 3"), ("qwen2vl", "Qwen2-VL"), ("internvl", "InternVL"))},
}
_KEYS = ("B", "L", "img", "Dv", "Hv", "depth", "Iv", "D", "H", "Hkv", "layers", "I", "V", "patch", "window", "F")


@dataclass(frozen=True)
class _Variant:
    patched: bool
    packed: bool
    sac: bool


def _transformers_missing() -> str | None:
    try:
        import transformers

        transformers.Qwen2_5_VLForConditionalGeneration  # noqa: B018
    except (ImportError, AttributeError) as exc:
        return f"needs transformers with Qwen2_5_VLForConditionalGeneration ({type(exc).__name__}: {exc})"
    return None


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] for head dim 128, scaled: (t, h, w) rotary pairs adding up to head_dim / 2."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def build_model(s: TrainShape, dtype=torch.float32, device="cpu", seed: int = 0):
    """The step's model: ``Qwen2_5_VLForConditionalGeneration`` of shape ``s``, random weights
    (``seed``), training mode, no KV cache."""
    import transformers

    v = s.V
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=s.depth, hidden_size=s.Dv, intermediate_size=s.Iv, num_heads=s.Hv,
                           patch_size=s.patch, spatial_merge_size=2, temporal_patch_size=2, window_size=s.window,
                           fullatt_block_indexes=list(range(s.F - 1, s.depth, s.F)) or [s.depth - 1],
                           out_hidden_size=s.D),
        text_config=dict(hidden_size=s.D, intermediate_size=s.I, num_hidden_layers=s.layers,
                         num_attention_heads=s.H, num_key_value_heads=s.Hkv, vocab_size=v, use_cache=False,
                         max_position_embeddings=max(4096, 2 * s.L),
                         rope_scaling=dict(type="mrope", mrope_section=_mrope_section(s.D // s.H))),
        image_token_id=v - 3, vision_start_token_id=v - 2, vision_end_token_id=v - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    return model.to(device=device, dtype=dtype).train()


def make_batches(model, s: TrainShape, dtype, device, generator) -> dict:
    """The same samples as a padded batch and as one packed row (M-RoPE positions of each sample
    from 0, the first label of each sample ignored: the padded rows never predict their first
    token either), as transformers' Qwen2.5-VL takes them."""
    cfg = model.config
    image, vstart, vend = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    text_vocab = max(2, s.V - 3)
    pix_width = 3 * 2 * s.patch * s.patch
    samples = []
    for n, h, w in s.samples():
        k = h * w // 4
        pre = max(1, (n - k - 2) // 3)
        post = n - k - 2 - pre
        ids = torch.cat([torch.randint(0, text_vocab, (pre,), generator=generator, device=device),
                         torch.tensor([vstart], device=device), torch.full((k,), image, device=device),
                         torch.tensor([vend], device=device),
                         torch.randint(0, text_vocab, (post,), generator=generator, device=device)])
        samples.append(dict(ids=ids, grid=torch.tensor([[1, h, w]], device=device),
                            pix=torch.randn(h * w, pix_width, generator=generator, device=device).to(dtype)))
    longest = max(len(x["ids"]) for x in samples)

    def pad(t, value):
        return torch.cat([t, t.new_full((longest - len(t),), value)])

    pixel_values = torch.cat([x["pix"] for x in samples])
    grid = torch.cat([x["grid"] for x in samples])
    padded = dict(input_ids=torch.stack([pad(x["ids"], 0) for x in samples]),
                  attention_mask=torch.stack([pad(torch.ones_like(x["ids"]), 0) for x in samples]),
                  labels=torch.stack([pad(x["ids"], -100) for x in samples]),
                  pixel_values=pixel_values, image_grid_thw=grid)
    padded["mm_token_type_ids"] = (padded["input_ids"] == image).int()
    positions, labels = [], []
    with torch.no_grad():
        for x in samples:
            types = (x["ids"] == image).int()[None]
            positions.append(model.model.get_rope_index(x["ids"][None], types, image_grid_thw=x["grid"])[0])
            lab = x["ids"].clone()
            lab[0] = -100
            labels.append(lab)
    ids = torch.cat([x["ids"] for x in samples])[None]
    packed = dict(input_ids=ids, mm_token_type_ids=(ids == image).int(), position_ids=torch.cat(positions, -1),
                  labels=torch.cat(labels)[None], pixel_values=pixel_values, image_grid_thw=grid)
    return {"padded": padded, "packed": packed}


def _checkpointing(model, on: bool) -> None:
    """Selective activation checkpointing of every vision block and decoder layer with
    mmkernels' policy, through transformers' own switch (on), or none (off)."""
    if not on:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
        return
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from ..ops import sac_policy

    kwargs = {"use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts,
                                                                      sac_policy())}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def _no_interpreter():
    """The patched backends' context: under ``TRITON_INTERPRET=1`` (the test suite on a CPU) the
    dispatcher's CPU route (SDPA), as in a plain CPU run: the interpreter would spend seconds of
    Python per step on a tiny model, a time that says nothing (the kernels' results are the tests')."""
    from .._utils import interpreting

    if not interpreting():
        yield
        return
    old = os.environ["TRITON_INTERPRET"]
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        os.environ["TRITON_INTERPRET"] = old


class _Trainer:
    """One model (and its AdamW) per (shape, dtype, device), switched between the backends' set-ups
    in place: patched or not, the packing hook, checkpointing."""

    def __init__(self, s: TrainShape, dtype, device):
        self.key = (s, dtype, str(device))
        self.model = build_model(s, dtype, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.0)
        self.patched = self.sac = False

    def configure(self, v: _Variant) -> None:
        import mmkernels
        from mmkernels.integrations.qwen_vl import enable_mrope_packing

        if v.patched != self.patched:
            if v.patched:
                mmkernels.patch(self.model)
                enable_mrope_packing(self.model)  # only batch-1 calls without attention_mask: the packed row
            else:
                mmkernels.unpatch(self.model)
                for m in self.model.modules():  # the packing hooks (unpatch leaves them: separate switch)
                    handle = m.__dict__.pop("_mmkernels_packing_hook", None)
                    if handle is not None:
                        handle.remove()
            self.patched = v.patched
        if v.sac != self.sac:
            _checkpointing(self.model, v.sac)
            self.sac = v.sac

    def step_fn(self, batch: dict, grad: bool):
        """fwd+bwd: the optimizer step on the previous call's gradients, then the forward (the
        runner runs the backward on the loss returned): every timed call is one whole step."""
        model, opt = self.model, self.opt

        def fn():
            if grad:
                opt.step()
                opt.zero_grad(set_to_none=True)
                return model(**batch).loss
            with torch.no_grad():
                return model(**batch).loss

        return fn


class TrainBench(OpBench):
    name = "train"
    title = "one training step of a Qwen2.5-VL-style model: padded vs packed (M-RoPE), with and without SAC"
    api = "patch"
    convention = CONVENTION
    presets = PRESETS
    baseline = "hf-padded"
    default_modes = ("fwd+bwd",)
    suite_modes = {"cpu": ("fwd+bwd",), "cuda": ("fwd+bwd",)}
    suite_backends = {"cpu": ("hf-padded", "mk-packed", "mk-packed-sac"),
                      "cuda": ("hf-padded", "mk-padded", "mk-packed", "mk-padded-sac", "mk-packed-sac")}

    def __init__(self):
        self._trainer: _Trainer | None = None

    def unavailable(self) -> str | None:
        return super().unavailable() or _transformers_missing()

    def parse_shape(self, text):
        kv = parse_kv(text, {k: int for k in _KEYS})
        shape = replace(PRESETS["qwen25vl"][0].shape, **kv)  # unnamed keys: the qwen25vl preset's
        for a, b, what in ((shape.Dv, shape.Hv, "Dv / Hv"), (shape.D, shape.H, "D / H"),
                           (shape.H, shape.Hkv, "H / Hkv")):
            if a % b:
                raise ValueError(f"--shape {text!r}: {what} is not a whole number")
        if shape.img % 2 or shape.img < 2:
            raise ValueError(f"--shape {text!r}: img={shape.img} must be even (2x2 patch merge)")
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s, quick):
        if quick:  # the tiny model of tests/test_training.py: seconds per step on two cores
            return TrainShape(B=3, L=24, img=4, Dv=32, Hv=2, depth=2, Iv=32, D=32, H=2, Hkv=1, layers=1, I=64, V=64,
                              patch=2, window=8, F=2)
        return replace(s, B=min(s.B, 4), L=min(s.L, 256), img=min(s.img, 8), depth=min(s.depth, 4),
                       layers=min(s.layers, 2), Dv=min(s.Dv, 256), Iv=min(s.Iv, 512), D=min(s.D, 256),
                       I=min(s.I, 512), V=min(s.V, 4096), H=min(s.H, 4), Hkv=min(s.Hkv, 2), Hv=min(s.Hv, 4))

    def describe(self, s):
        return (f"B={s.B} L={s.L} img={s.img} Dv={s.Dv} Hv={s.Hv} depth={s.depth} Iv={s.Iv} D={s.D} H={s.H} "
                f"Hkv={s.Hkv} layers={s.layers} I={s.I} V={s.V} patch={s.patch} window={s.window} F={s.F}")

    def x(self, s):
        return s.tokens

    def backends(self):
        def b(name, desc, v):
            return Backend(name, desc, v, context=_no_interpreter if v.patched else contextlib.nullcontext)

        return {
            "hf-padded": b("hf-padded", "transformers (sdpa), padded batch", _Variant(False, False, False)),
            "mk-padded": b("mk-padded", "mmkernels.patch, padded batch (auto backend)", _Variant(True, False, False)),
            "mk-packed": b("mk-packed", "mmkernels.patch + enable_mrope_packing: one packed row, no padding",
                           _Variant(True, True, False)),
            "mk-padded-sac": b("mk-padded-sac", "mk-padded + selective checkpointing (mk.ops.sac_policy) of every "
                               "vision block and decoder layer", _Variant(True, False, True)),
            "mk-packed-sac": b("mk-packed-sac", "mk-packed + selective checkpointing (mk.ops.sac_policy)",
                               _Variant(True, True, True)),
        }

    def _trainer_for(self, s, dtype, device) -> _Trainer:
        key = (s, dtype, str(device))
        if self._trainer is None or self._trainer.key != key:
            self._trainer = None  # one shape's model at a time
            self._trainer = _Trainer(s, dtype, device)
        return self._trainer

    def make_inputs(self, s, dtype, device, generator):
        trainer = self._trainer_for(s, dtype, device)
        trainer.configure(_Variant(False, False, False))
        batches = make_batches(trainer.model, s, dtype, device, generator)
        return {**batches, "dout": torch.ones((), device=device, dtype=torch.float32)}

    def bind(self, backend, s, inputs, grad):
        v: _Variant = backend.call
        device = inputs["dout"].device
        dtype = inputs["padded"]["pixel_values"].dtype
        trainer = self._trainer_for(s, dtype, device)
        trainer.configure(v)
        batch = inputs["packed" if v.packed else "padded"]
        return Bound(trainer.step_fn(batch, grad), {}, inputs["dout"] if grad else None)

    def reference(self, s, inputs, grad=False):
        """The unpatched model's loss on the padded batch: float64 on a CPU, float32 on CUDA (a
        float64 copy of a 3B-width model beside the timed one costs more memory than it tells)."""
        device = inputs["dout"].device
        ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
        model = build_model(s, ref_dtype, device)
        batch = {k: (t.to(ref_dtype) if t.is_floating_point() else t) for k, t in inputs["padded"].items()}
        with torch.no_grad():
            loss = model(**batch).loss.double()
        del model
        return loss, {}

    def ref_slice(self, t):
        return t  # the loss: a scalar

    def check(self, out, grads, ref, ref_grads, dtype):
        c = {"finite": bool(torch.isfinite(out).all())}
        c["max_abs_err"], c["rel_err"] = rel_error(out, ref)
        # the loss of a whole model: the bf16 rounding of every layer adds up
        tol = {"bfloat16": 3e-2, "float16": 1e-2}.get(dtype, 1e-4)
        c["ok"] = bool(c["finite"] and c["rel_err"] <= tol)
        return c

    def flops(self, s, mode):
        lm_linear = s.layers * (2 * s.D * s.D + 2 * s.D * (s.D // s.H) * s.Hkv + 3 * s.D * s.I) + s.D * s.V
        # per patch: the patch embedding, every block's qkv + proj + MLP, the merger's two Linears (per 4 patches)
        v_linear = (6 * s.patch * s.patch * s.Dv + s.depth * (4 * s.Dv * s.Dv + 3 * s.Dv * s.Iv)
                    + (16 * s.Dv * s.Dv + 4 * s.Dv * s.D) / 4)
        patches = sum(h * w for _, h, w in s.samples())
        lm_attn = s.layers * sum(n * n / 2 for n, _, _ in s.samples()) * 4 * s.D
        full = sum((h * w) ** 2 for _, h, w in s.samples())
        side = max(1, s.window // s.patch)  # window side in patches
        windowed = patches * side * side
        n_full = len(range(s.F - 1, s.depth, s.F)) or 1
        v_attn = 4 * s.Dv * (n_full * full + (s.depth - n_full) * windowed)
        fwd = 2 * (lm_linear * s.tokens + v_linear * patches) + lm_attn + v_attn
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]

    def summary_notes(self, rows):
        notes = []
        for r in rows:
            if r.get("status") != "ok" or not r.get("ms_p50"):
                continue
            p = r["params"]
            s = TrainShape(**p)
            tok_s = s.tokens / (r["ms_p50"] / 1e3)
            pad = "" if "packed" in r["backend"] else f", {s.padded_tokens - s.tokens} padding positions"
            mem = f", peak {r['peak_mem_mib']:.0f} MiB" if r.get("peak_mem_mib") is not None else ""
            notes.append(f"{r['preset']}/{r['case']} {r['backend']}: {r['ms_p50']:.1f} ms/step, "
                         f"{tok_s:,.0f} tokens/s ({s.tokens} real tokens{pad}){mem}")
        if rows and all(r.get("peak_mem_mib") is None for r in rows if r.get("status") == "ok"):
            notes.append("peak memory is measured on CUDA only (torch.cuda.max_memory_allocated); "
                         "this CPU run reports step times")
        return notes


BENCH = TrainBench()
