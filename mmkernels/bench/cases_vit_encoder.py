"""Benchmark cases of a whole vision encoder's attention, called as the serving engines call it:
every layer's packed attention of one Qwen2.5-VL or Qwen3-VL vision-tower forward (``mmkernels
bench vit_encoder``), per backend, mmkernels against each engine backend that runs here.

One case is one image or video through one tower: the timed call runs the attention of every layer
in order — Qwen2.5-VL's 32 layers (the full-attention blocks 7, 15, 23, 31 over each frame, the 28
others over 112-px windows) or Qwen3-VL's 27 (all full) — on packed ``(total, H, d)`` q/k/v, with
the prefix sums the towers build (:func:`full_seqlens`, :func:`window_seqlens`: the arithmetic of
transformers' ``get_vision_window_index``, checked against the real model in
tests/test_bench_vit_encoder.py). The q/k/v come already rotated (both engines apply RoPE in their
own op before the attention call), so no backend here does RoPE. Layers cycle through distinct q/k/v
sets (> 192 MiB together, capped at the depth), so a layer does not read the previous layer's
operands from the L2 cache. The checked output is the last window layer's and the last full layer's
output, stacked (one ``(total, H, d)`` copy each per forward, the same for every backend).

Shapes (the processors' ``smart_resize``, the model repositories' pixel limits): an image of
448×448, one of 1920×1080 (Qwen2.5-VL 1092×1932 → 78×138 patches, 10,764 tokens, 180 windows;
Qwen3-VL 1088×1920 → 68×120, 8,160 tokens) and 32 frames of 640×360 video (temporal patch 2 → 16
groups; Qwen2.5-VL 26×46 patches a group, 19,136 tokens, 384 windows; Qwen3-VL 22×40, 14,080).
Full attention is per frame group, as transformers and vLLM pack it (SGLang 0.5.23's Qwen2.5-VL
packs a whole video as one sequence in its full layers; its Qwen3-VL packs per frame).

Backends: ``sdpa-loop`` (the baseline: vLLM's ``TORCH_SDPA`` and transformers' sdpa path —
lengths to the host with ``.tolist()`` every layer, one SDPA call per sequence, a cat);
``sdpa-dense`` (one SDPA call with a ``(total, total)`` block-diagonal mask built once per layout);
``mk`` (``mmkernels.attention_varlen``, the dispatcher's choice) and ``triton`` (forced to the Triton
kernel), with ``max_seqlen`` hints; ``flash-attn`` (``flash_attn_varlen_func``, CUDA, when
importable); ``triton-graph`` / ``flash-graph``: the whole forward (every layer) captured in
one ``torch.cuda.CUDAGraph`` and replayed — mmkernels writes into preallocated buffers through
``out=`` when ``mmkernels.attention_varlen`` takes it (else the call's result is copied in, inside
the graph). Engine backends, where the engine is importable (``scripts/engine_tests.sh``'s venvs):
``vllm`` (vLLM's ``MMEncoderAttention`` with the backend vLLM picks for the platform: ``TORCH_SDPA``
on a CPU, ``FLASH_ATTN`` on most GPUs; called like vLLM's towers: ``(1, S, H, D)``, device
``cu_seqlens``, a CPU ``max_seqlen`` tensor), ``vllm-mk`` (the same layer from
``mmkernels.integrations.vllm``, ``MMKERNELS_VLLM=1``'s class), ``sglang-sdpa``,
``sglang-triton``, ``sglang-fa3`` (SGLang's ``QKV_BACKEND_IMPL``; its default is ``fa3`` on
Hopper, ``triton_attn`` on other CUDA GPUs, ``sdpa`` on a CPU) and ``sglang-mk``
(``--mm-attention-backend mmkernels``), each called as SGLang's ``VisionAttention`` calls it (packed
``(B·S, H, D)``, ``cu_seqlens`` plus the ``forward_metadata`` built once per forward).

FLOPs: Σ over layers and sequences of 4·L²·d·H (QKᵀ and PV); inference only (``--mode fwd``).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .cases import Backend, Bound, OpBench, ShapeSpec, Skip, mk_backend, parse_kv
from .cases_attention import _importable

__all__ = ["BENCH", "MODELS", "VitEncoderShape", "full_seqlens", "qwen_grid", "smart_resize", "video_smart_resize",
           "window_seqlens"]

CHECK_HEADS = 2
MIB = 1 << 20
GIB = 1 << 30
#: the distinct q/k/v sets the layers cycle through add up to at least this (capped at the depth)
POOL_BYTES = 192 * MIB
REF_CHUNK = 2048  # query rows per float64 reference block


# ---- the towers' geometry ----------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    """A vision tower: patch, spatial merge, temporal patch, window (px; 0 = none), heads, head dim,
    depth, full-attention layers (None: every layer), and the processors' pixel limits (image:
    per image; video: per frame, or for the whole clip's t·h·w when ``video_per_clip``)."""

    key: str
    title: str
    patch: int
    merge: int
    temporal: int
    window_px: int
    H: int
    d: int
    depth: int
    full_layers: tuple[int, ...] | None
    image_pixels: tuple[int, int]
    video_pixels: tuple[int, int]
    video_per_clip: bool


MODELS = {
    # Qwen/Qwen2.5-VL-*: vision_config (depth 32, hidden 1280, 16 heads, window 112, fullatt 7/15/23/31);
    # preprocessor_config.json min_pixels 3136, max_pixels 12845056; video frames 128..768 x 28²
    "qwen25vl": Model("qwen25vl", "Qwen2.5-VL", 14, 2, 2, 112, 16, 80, 32, (7, 15, 23, 31), (3136, 12845056),
                      (128 * 28 * 28, 768 * 28 * 28), False),
    # Qwen/Qwen3-VL-8B-*: vision_config (depth 27, hidden 1152, 16 heads, patch 16); preprocessor size
    # shortest_edge 65536 / longest_edge 16777216; video_preprocessor 4096 / 25165824 over t*h*w
    "qwen3vl": Model("qwen3vl", "Qwen3-VL", 16, 2, 2, 0, 16, 72, 27, None, (65536, 16777216), (4096, 25165824),
                     True),
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The Qwen-VL image processors' resize: both sides multiples of ``factor`` (patch·merge), the
    area within [min_pixels, max_pixels], the aspect ratio kept as closely as possible."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_smart_resize(frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int,
                       max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video resize: the limits apply to the clip's t·h·w."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_grid(model: Model, height: int, width: int, frames: int = 1) -> tuple[int, int, int]:
    """(t, h, w) in patches — the processor's ``image_grid_thw`` / ``video_grid_thw`` — of an image
    (``frames`` 1) or a clip of ``frames`` frames of height × width pixels."""
    factor = model.patch * model.merge
    if frames == 1:
        h, w = smart_resize(height, width, factor, *model.image_pixels)
        return 1, h // model.patch, w // model.patch
    if model.video_per_clip:
        h, w = video_smart_resize(frames, height, width, model.temporal, factor, *model.video_pixels)
    else:
        h, w = smart_resize(height, width, factor, *model.video_pixels)
    return max(1, round(frames / model.temporal)), h // model.patch, w // model.patch


def full_seqlens(grids) -> tuple[int, ...]:
    """The full-attention layers' sequences: one per frame group (h·w patches), as transformers'
    ``get_vision_cu_seqlens`` and vLLM pack them."""
    return tuple(h * w for t, h, w in grids for _ in range(t))


def window_seqlens(grids, patch: int = 14, merge: int = 2, window_px: int = 112) -> tuple[int, ...]:
    """Qwen2.5-VL's window layers' sequences: each frame group's merged (h/merge × w/merge) grid cut
    into windows of window_px/(patch·merge) units, row-major, edge windows smaller, merge² patches a
    unit (transformers' ``get_vision_window_index`` with the empty windows dropped)."""
    win, unit = window_px // merge // patch, merge * merge
    out: list[int] = []
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        frame = [min(win, gh - i) * min(win, gw - j) * unit for i in range(0, gh, win) for j in range(0, gw, win)]
        out += frame * t
    return tuple(out)


@dataclass(frozen=True)
class VitEncoderShape:
    """One tower forward: ``grids`` (t, h, w) in patches (one entry per image or video, packed
    together), ``H`` heads of ``d``, ``depth`` layers of which ``full_layers`` attend over whole frames
    (None: all) and the others over windows of ``window_px`` (0: no windows)."""

    model: str
    grids: tuple[tuple[int, int, int], ...]
    H: int = 16
    d: int = 80
    depth: int = 32
    full_layers: tuple[int, ...] | None = (7, 15, 23, 31)
    patch: int = 14
    merge: int = 2
    window_px: int = 112

    @property
    def total(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)

    @property
    def windowed(self) -> bool:
        return bool(self.window_px) and self.full_layers is not None and len(set(self.full_layers)) < self.depth

    def kinds(self) -> tuple[str, ...]:
        """Each layer's packing: "full" or "window"."""
        return tuple("full" if not self.windowed or i in self.full_layers else "window" for i in range(self.depth))

    def seqlens(self, kind: str) -> tuple[int, ...]:
        return (window_seqlens(self.grids, self.patch, self.merge, self.window_px) if kind == "window"
                else full_seqlens(self.grids))

    def order(self) -> tuple[str, ...]:
        """The packings present, in the order the checked output stacks them."""
        return tuple(k for k in ("window", "full") if k in self.kinds())


def _grid_text(grids) -> str:
    return "+".join(f"{t}x{h}x{w}" for t, h, w in grids)


def _spec(key: str, case: str, what: str, height: int, width: int, frames: int = 1) -> ShapeSpec:
    m = MODELS[key]
    grid = qwen_grid(m, height, width, frames)
    s = VitEncoderShape(m.key, (grid,), m.H, m.d, m.depth, m.full_layers, m.patch, m.merge, m.window_px)
    t, h, w = grid
    full = s.seqlens("full")
    label = (f"{m.title} ViT, {what}: {h * m.patch}x{w * m.patch} px"
             + (f", {t} groups of {m.temporal} frames" if frames > 1 else "")
             + f" -> {s.total} tokens; {len(full)} full sequence(s) of {max(full)}")
    if s.windowed:
        win = s.seqlens("window")
        label += f", {len(win)} windows of <= {max(win)}; {s.depth} layers ({len(m.full_layers)} full)"
    else:
        label += f"; {s.depth} layers, all full"
    return ShapeSpec(m.key, case, label, s)


def _shapes(key: str) -> list[ShapeSpec]:
    return [_spec(key, "img448", "448x448 image", 448, 448),
            _spec(key, "img1080p", "1920x1080 image", 1080, 1920),
            _spec(key, "video32f", "32-frame 640x360 video", 360, 640, 32)]


_DENSE_VIT = "{} runs fixed-size images through a dense ViT: `mmkernels bench attention`"
_DENSE_MODELS = (("blip2", "BLIP-2's EVA ViT-g"), ("instructblip", "InstructBLIP's EVA ViT-g"),
                 ("llava15", "LLaVA-1.5's CLIP"), ("llava-ov", "LLaVA-OneVision's SigLIP"),
                 ("gemma3", "Gemma 3's SigLIP"), ("internvl", "InternVL's InternViT"))
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "qwen25vl": _shapes("qwen25vl"),
    "qwen3vl": _shapes("qwen3vl"),
    "qwen2vl": ("Qwen2-VL's tower is Qwen2.5-VL's call with every layer full (H=16, d=80, 32 layers): "
                "--shape model=qwen25vl,full=all, or `mmkernels bench attention_varlen --preset qwen2vl`"),
    **{p: _DENSE_VIT.format(m) for p, m in _DENSE_MODELS},
}


# ---- backends -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """One packing of the forward: ``cu`` int32 prefix sums on the device, the lengths, their max."""

    kind: str
    cu: torch.Tensor
    seqlens: tuple[int, ...]
    max_seqlen: int


def _sdpa_loop(s, lay, dtype):
    def fn(q, k, v):
        lens = (lay.cu[1:] - lay.cu[:-1]).tolist()  # the host sync vLLM's TORCH_SDPA does each layer
        outs = [F.scaled_dot_product_attention(a.transpose(0, 1), b.transpose(0, 1), c.transpose(0, 1)).transpose(0, 1)
                for a, b, c in zip(q.split(lens), k.split(lens), v.split(lens))]
        return torch.cat(outs)
    return fn


def _sdpa_dense(s, lay, dtype):
    seg = torch.searchsorted(lay.cu[1:], torch.arange(s.total, device=lay.cu.device, dtype=lay.cu.dtype), right=True)
    mask = seg[:, None] == seg[None, :]

    def fn(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], attn_mask=mask)[0].transpose(0, 1)
    return fn


def _out_kw() -> bool:
    import mmkernels

    try:
        return "out" in inspect.signature(mmkernels.attention_varlen).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _mk(s, lay, dtype, out=False):
    import mmkernels

    m = lay.max_seqlen
    if out and _out_kw():
        return lambda q, k, v, o: mmkernels.attention_varlen(q, k, v, lay.cu, lay.cu, max_seqlen_q=m, max_seqlen_k=m,
                                                             out=o)
    fn = lambda q, k, v: mmkernels.attention_varlen(q, k, v, lay.cu, lay.cu, max_seqlen_q=m, max_seqlen_k=m)  # noqa: E731
    return (lambda q, k, v, o: o.copy_(fn(q, k, v))) if out else fn


def _flash_attn(s, lay, dtype, out=False):
    from flash_attn import flash_attn_varlen_func

    m = lay.max_seqlen
    fn = lambda q, k, v: flash_attn_varlen_func(q, k, v, lay.cu, lay.cu, m, m)  # noqa: E731
    return (lambda q, k, v, o: o.copy_(fn(q, k, v))) if out else fn


class _Graphed:
    """``make(s, layout, dtype, out=True)`` captured over the whole forward: the layers' calls in one
    ``torch.cuda.CUDAGraph`` (warmed up on a side stream first: Triton autotunes and compiles there)."""

    graphed = True

    def __init__(self, make):
        self.make = make

    def __call__(self, s, lay, dtype, out=True):
        return self.make(s, lay, dtype, out=True)


def _graph_why_not(inner: Backend):
    def why_not(device):
        if getattr(device, "type", device) != "cuda":
            return "CUDA graphs need a CUDA device"
        return inner.why_not(device)
    return why_not


# ---- the engines --------------------------------------------------------------------------------
_VLLM_MOD = "vllm.model_executor.layers.attention.mm_encoder_attention"
_ENGINE_HOW = ("; scripts/engine_tests.sh builds a venv with it ($MMK_ENGINE_VENVS/{0}, default /work/venvs/{0}): "
               "run this benchmark with that venv's python")


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _engine_why_not(engine: str, extra=None):
    def why_not(device):
        if not _find(engine):
            return f"{engine} is not installed in this Python" + _ENGINE_HOW.format(engine)
        return extra(device) if extra else None
    return why_not


_VLLM_LAYERS: dict = {}


def _vllm_layer(H: int, d: int, dtype, device, plugin: bool):
    """vLLM's ``MMEncoderAttention`` (``plugin``: the mmkernels subclass), built as a vision tower builds
    it: inside a ``VllmConfig``, under the model's default dtype (vLLM picks the backend from it)."""
    key = (H, d, dtype, str(device), plugin)
    if key in _VLLM_LAYERS:
        return _VLLM_LAYERS[key]
    if torch.device(device).type == "cpu":
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vLLM cannot infer a CPU device without it
    from vllm.config import VllmConfig, set_current_vllm_config

    base = importlib.import_module(_VLLM_MOD).MMEncoderAttention
    cls = base
    if plugin:
        from ..integrations import vllm as mk_vllm

        problems = mk_vllm.signature_problems(base)
        if problems:
            raise Skip(f"vLLM's MMEncoderAttention differs from the contract mmkernels supports: {'; '.join(problems)}")
        cls = mk_vllm.build_encoder_attention_class(base)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with set_current_vllm_config(VllmConfig()):
            layer = cls(H, d, scale=d ** -0.5, prefix="visual.blocks.0.attn.attn")
    finally:
        torch.set_default_dtype(old)
    if plugin and not getattr(layer, "_mk_active", False):
        raise Skip("the mmkernels vLLM layer keeps vLLM's own attention here (FP8 or an explicit FlashInfer backend)")
    if not plugin and type(layer) is not base:
        raise Skip(f"MMEncoderAttention(...) built {type(layer).__qualname__}: another plug-in replaced vLLM's class "
                   "in this process (MMKERNELS_VLLM=1 with vLLM's plug-ins loaded?)")
    _VLLM_LAYERS[key] = layer
    return layer


def _vllm(plugin: bool):
    def make(s, lay, dtype):
        import numpy as np

        layer = _vllm_layer(s.H, s.d, dtype, lay.cu.device, plugin)
        cls, backend = type(layer), layer.attn_backend
        # the metadata vLLM's towers compute once per forward, through the layer class's classmethods
        cu_np = np.asarray((0, *np.cumsum(lay.seqlens)), dtype=np.int32)
        max_seqlen = torch.tensor(cls.compute_max_seqlen(backend, cu_np), dtype=torch.int32)
        seq_lens = cls.maybe_compute_seq_lens(backend, cu_np, lay.cu.device)
        cu = cls.maybe_recompute_cu_seqlens(backend, cu_np, s.H * s.d, 1, lay.cu.device)

        def fn(q, k, v):
            return layer(q[None], k[None], v[None], cu_seqlens=cu, max_seqlen=max_seqlen,
                         sequence_lengths=seq_lens)[0]
        return fn
    return make


def _sglang(name: str):
    def make(s, lay, dtype):
        from sglang.srt.layers.attention.vision import QKV_BACKEND_IMPL, prepare_vision_attention_metadata

        if name == "mmkernels":
            from ..integrations import sglang as mk_sglang

            impl = mk_sglang.build_backend_class()
        elif name not in QKV_BACKEND_IMPL:
            raise Skip(f"SGLang has no {name!r} vision attention backend (it has: {', '.join(QKV_BACKEND_IMPL)})")
        else:
            impl = QKV_BACKEND_IMPL[name]
        scale = s.d ** -0.5
        try:  # VisionAttention's call (Qwen2.5-VL / Qwen3-VL: flatten_batch=True)
            layer = impl(head_dim=s.d, num_heads=s.H, num_kv_heads=s.H, dropout=0.0, flatten_batch=True,
                         softmax_in_single_precision=False, softmax_scale=scale, use_data_parallel=False,
                         workspace_buffer=None)
        except Exception as exc:  # fa3 on a CPU, ...
            raise Skip(f"SGLang's {name} backend cannot be built here: {type(exc).__name__}: {exc}") from None
        meta = prepare_vision_attention_metadata(lay.cu, device=lay.cu.device)  # once per forward in SGLang

        def fn(q, k, v):
            return layer.forward(q=q, k=k, v=v, bsz=1, seq_len=q.shape[0], cu_seqlens=lay.cu, attention_mask=None,
                                 forward_metadata=meta, sequence_lengths=None, max_seqlen=None, output_ws=None,
                                 softmax_scale=scale, window_size=(-1, -1), s_aux=None)
        return fn
    return make


def _sglang_triton_why_not(device):
    from .._utils import interpreting

    if getattr(device, "type", device) == "cpu" and not interpreting():
        return "SGLang's triton_attn is a Triton kernel: CUDA, or TRITON_INTERPRET=1 on a CPU"
    return None


def _cuda_only(what: str):
    return lambda device: None if getattr(device, "type", device) == "cuda" else f"{what} runs on CUDA only"


# ---- the op ---------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace("+", ":").split(":") if x)


def _grids(text: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for g in filter(None, text.split("+")):
        t, h, w = (int(x) for x in g.lower().split("x"))
        out.append((t, h, w))
    return tuple(out)


def _full(text: str):
    return None if text.strip().lower() == "all" else _ints(text)


class VitEncoderBench(OpBench):
    name = "vit_encoder"
    title = "one vision-tower forward's attention calls (Qwen2.5-VL / Qwen3-VL), mmkernels vs the engines' backends"
    api = "attention_varlen"
    metric = "tflops"
    convention = ("fwd = sum over layers and sequences of 4*L^2*d*H (QK^T and PV); every layer of one tower forward "
                  "per call; RoPE (the engines' own op), softmax and masks not counted")
    presets = PRESETS
    extra_presets = ("qwen3vl",)
    baseline = "sdpa-loop"
    default_modes = ("fwd",)
    suite_backends = {"cpu": ("sdpa-loop", "sdpa-dense"),
                      "cuda": ("sdpa-loop", "sdpa-dense", "triton", "triton-graph", "flash-attn")}
    suite_modes = {"cpu": ("fwd",), "cuda": ("fwd",)}

    def parse_shape(self, text):
        kv = parse_kv(text, {"model": str, "grid": _grids, "px": str, "frames": int, "H": int, "d": int,
                             "depth": int, "full": _full, "window": int})
        m = MODELS.get(kv.pop("model", "qwen25vl"))
        if m is None:
            raise ValueError(f"--shape {text!r}: model must be one of {', '.join(MODELS)}")
        if "grid" in kv:
            grids = kv.pop("grid")
        elif "px" in kv:
            try:
                h, w = (int(x) for x in kv.pop("px").lower().split("x"))
            except ValueError:
                raise ValueError(f"--shape {text!r}: px=HEIGHTxWIDTH (e.g. px=1080x1920)") from None
            grids = (qwen_grid(m, h, w, kv.get("frames", 1)),)
        else:
            raise ValueError(f"--shape {text!r}: give grid=TxHxW (patches; + between images) or px=HxW[,frames=N] "
                             "(e.g. model=qwen25vl,px=1080x1920)")
        kv.pop("frames", None)
        if any(min(g) < 1 for g in grids) or any(h % m.merge or w % m.merge for _, h, w in grids):
            raise ValueError(f"--shape {text!r}: grid sides must be positive multiples of the merge size {m.merge}")
        shape = VitEncoderShape(m.key, grids, kv.get("H", m.H), kv.get("d", m.d), kv.get("depth", m.depth),
                                kv["full"] if "full" in kv else m.full_layers, m.patch, m.merge,
                                kv.get("window", m.window_px))
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s, quick):
        """The same geometry on a small grid (longest side <= 16 patches quick, 32 else, sides multiples
        of the merge), 2 (4) frame groups, 2 (4) heads, 2 layers (one window, one full) or 1 (4: two of
        each, or 2)."""
        cap, tmax, heads = (16, 2, 2) if quick else (32, 4, 4)
        m = s.merge

        def small(g):
            t, h, w = g
            f = min(1.0, cap / max(h, w))
            return min(t, tmax), max(2 * m, int(h * f) // m * m), max(2 * m, int(w * f) // m * m)

        if s.windowed:
            depth, full = (2, (1,)) if quick else (4, (1, 3))
        else:
            depth, full = (1, None) if quick else (2, None)
        return replace(s, grids=tuple(small(g) for g in s.grids[:2]), H=min(s.H, heads), depth=depth,
                       full_layers=full if s.full_layers is not None else None)

    def describe(self, s):
        text = f"{s.model} {_grid_text(s.grids)} tok={s.total}"
        if s.windowed:
            text += f" win={len(s.seqlens('window'))}"
        n_full = s.kinds().count("full")
        return text + f" L={s.depth}" + (f"({n_full}f)" if s.windowed else "") + f" H={s.H} d={s.d}"

    def params(self, s):
        p = {**super().params(s), "total": s.total, "full_seqs": len(s.seqlens("full")),
             "full_layer_count": s.kinds().count("full")}
        if s.windowed:
            p["windows"] = len(s.seqlens("window"))
        return p

    def x(self, s):
        return s.total

    def backends(self):
        from .._utils import interpreting

        # under TRITON_INTERPRET=1 the dispatcher's choice (and the engines' mmkernels layers) is the Triton
        # kernel in the interpreter: a check, not a timing (the CLI leaves such backends out unless named)
        interp = interpreting()
        mk = Backend("mk", "mmkernels.attention_varlen, the dispatcher's choice, max_seqlen hints", _mk,
                     gpu_kernel=interp)
        triton = mk_backend("attention_varlen", "triton", _mk,
                            'mmkernels.attention_varlen(..., backend="triton"): one launch per layer')
        flash = Backend("flash-attn", "flash_attn.flash_attn_varlen_func", _flash_attn,
                        _importable("flash_attn", "flash-attn"), gpu_kernel=True)
        graph_how = ("out= buffers" if _out_kw_safe() else "the result copied into buffers: "
                     "mmkernels.attention_varlen has no out= yet")
        return {
            "sdpa-loop": Backend("sdpa-loop", "vLLM's TORCH_SDPA / transformers' sdpa: lengths to the host each layer, "
                                 "one SDPA per sequence, cat", _sdpa_loop),
            "sdpa-dense": Backend("sdpa-dense", "one SDPA call with a (total, total) block-diagonal mask (built once)",
                                  _sdpa_dense, score_bytes=1),
            "mk": mk,
            "triton": triton,
            "triton-graph": Backend("triton-graph", f"triton, every layer in one CUDA graph ({graph_how})",
                                    _Graphed(_mk), _graph_why_not(triton), triton.context, gpu_kernel=True),
            "flash-attn": flash,
            "flash-graph": Backend("flash-graph", "flash-attn, every layer in one CUDA graph", _Graphed(_flash_attn),
                                   _graph_why_not(flash), gpu_kernel=True),
            "vllm": Backend("vllm", "vLLM's MMEncoderAttention, the backend vLLM picks (CPU: TORCH_SDPA)", _vllm(False),
                            _engine_why_not("vllm")),
            "vllm-mk": Backend("vllm-mk", "vLLM's MMEncoderAttention as MMKERNELS_VLLM=1 makes it "
                               "(mmkernels.integrations.vllm)", _vllm(True), _engine_why_not("vllm"),
                               gpu_kernel=interp),
            "sglang-sdpa": Backend("sglang-sdpa", "SGLang's sdpa (block-diagonal mask cached on the host, copied in "
                                   "each layer)", _sglang("sdpa"), _engine_why_not("sglang"), score_bytes=1),
            "sglang-triton": Backend("sglang-triton", "SGLang's triton_attn (its default on non-Hopper CUDA GPUs)",
                                     _sglang("triton_attn"), _engine_why_not("sglang", _sglang_triton_why_not),
                                     gpu_kernel=True),
            "sglang-fa3": Backend("sglang-fa3", "SGLang's fa3 (its default on Hopper)", _sglang("fa3"),
                                  _engine_why_not("sglang", _cuda_only("SGLang's fa3")), gpu_kernel=True),
            "sglang-mk": Backend("sglang-mk", "--mm-attention-backend mmkernels (mmkernels.integrations.sglang)",
                                 _sglang("mmkernels"), _engine_why_not("sglang"), gpu_kernel=interp),
        }

    # ---- inputs, binding, reference ----------------------------------------------------------
    def _pool(self, s, itemsize: int) -> int:
        one = 3 * s.total * s.H * s.d * itemsize
        return max(1, min(s.depth, math.ceil(POOL_BYTES / one)))

    def make_inputs(self, s, dtype, device, generator):
        itemsize = torch.empty((), dtype=dtype).element_size()
        qkv = torch.randn((self._pool(s, itemsize), 3, s.total, s.H, s.d), generator=generator, device=device)
        out = {"qkv": qkv.to(dtype)}
        del qkv
        for kind in s.order():
            lens = s.seqlens(kind)
            out[f"cu_{kind}"] = torch.tensor((0, *torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,
                                             device=device)
        return out

    def _layouts(self, s, inputs):
        return {kind: Layout(kind, inputs[f"cu_{kind}"], s.seqlens(kind), max(s.seqlens(kind))) for kind in s.order()}

    def bind(self, backend, s, inputs, grad):
        if grad:
            raise Skip("vision encoders are served in inference: --mode fwd")
        qkv = inputs["qkv"]
        dtype = qkv.dtype
        sets = [tuple(qkv[i].unbind(0)) for i in range(qkv.shape[0])]
        kinds, order = s.kinds(), s.order()
        plan = [(kind, sets[i % len(sets)]) for i, kind in enumerate(kinds)]
        lays = self._layouts(s, inputs)
        if getattr(backend.call, "graphed", False):
            return self._bind_graph(backend, s, lays, plan, order, qkv)
        layer = {kind: backend.call(s, lays[kind], dtype) for kind in order}

        def fn():
            last = {}
            for kind, (q, k, v) in plan:
                last[kind] = layer[kind](q, k, v)
            return torch.stack([last[k] for k in order])
        return Bound(fn)

    def _bind_graph(self, backend, s, lays, plan, order, qkv):
        layer = {kind: backend.call(s, lays[kind], qkv.dtype) for kind in order}
        out = torch.empty((len(order), s.total, s.H, s.d), dtype=qkv.dtype, device=qkv.device)
        slot = {kind: out[i] for i, kind in enumerate(order)}

        def body():
            for kind, (q, k, v) in plan:
                layer[kind](q, k, v, slot[kind])

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # autotuning, compilation, lazy allocations: outside the capture
                body()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()

        def fn():
            graph.replay()
            return out
        fn.graph = graph  # kept alive with the bound call
        return Bound(fn)

    def ref_slice(self, t):
        return t[:, :, :CHECK_HEADS]

    def reference(self, s, inputs, grad=False):
        """The last window layer's and the last full layer's outputs (their q/k/v sets), per sequence
        in float64, on the first heads, in blocks of query rows."""
        qkv = inputs["qkv"]
        nh = min(CHECK_HEADS, s.H)
        kinds = s.kinds()
        outs = []
        for kind in s.order():
            i = max(j for j, kd in enumerate(kinds) if kd == kind) % qkv.shape[0]
            q, k, v = (qkv[i, n, :, :nh].double() for n in range(3))
            o = torch.empty_like(q)
            start = 0
            for L in s.seqlens(kind):
                kk, vv = k[start:start + L], v[start:start + L]
                for r in range(start, start + L, REF_CHUNK):
                    r1 = min(r + REF_CHUNK, start + L)
                    sc = torch.einsum("qhd,khd->hqk", q[r:r1], kk) / math.sqrt(s.d)
                    o[r:r1] = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vv)
                start += L
            outs.append(o)
        return torch.stack(outs), {}

    def memory_guard(self, backend, s, itemsize, mode, device):
        pool = self._pool(s, itemsize) * 3 * s.total * s.H * s.d * itemsize
        need = pool + 2 * len(s.order()) * s.total * s.H * s.d * itemsize
        if backend.score_bytes:  # the (total, total) mask, as an additive bias in SDPA, and SDPA's scores
            need += s.total * s.total * (1 + itemsize)
            if getattr(device, "type", device) == "cpu":
                need += 3 * s.H * s.total * s.total * 4
        if getattr(device, "type", device) == "cuda":
            free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
            limit = 0.85 * (free - torch.cuda.memory_allocated(device))
        else:
            limit = 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > limit:
            what = "inputs, outputs" + (", the dense mask" if backend.score_bytes else "")
            return f"needs ~{need / GIB:.1f} GiB ({what}) > {limit / GIB:.1f} GiB available"
        return None

    def flops(self, s, mode):
        per = {kind: sum(L * L for L in s.seqlens(kind)) for kind in s.order()}
        return 4.0 * s.d * s.H * sum(per[k] for k in s.kinds())


def _out_kw_safe() -> bool:
    try:
        return _out_kw()
    except Exception:  # noqa: BLE001 - a description only
        return False


BENCH = VitEncoderBench()
