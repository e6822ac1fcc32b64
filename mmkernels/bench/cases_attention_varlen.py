"""Benchmark cases of ``mmkernels.attention_varlen``: packed vision attention (one sequence per
image, frame or window), the Qwen2-VL / Qwen2.5-VL vision towers.

Presets: ``qwen2vl`` — 8 packed images of 256–4096 patches, 16 heads of 80; ``qwen25vl`` — one
1,000×2,500 px image (1,008×2,492 after the 28-px resize: 72×178 patches, 12,816 tokens) in the
windowed blocks (112-px windows: 207 sequences of <= 64 tokens) and the full blocks (7, 15, 23, 31:
one sequence). The vision RoPE is part of every backend (fused by mmkernels, in torch elsewhere).

Backends (packed (total, H, d) tensors, ``cu_seqlens``): ``hf-loop`` (the baseline: what
transformers runs for sdpa — RoPE, a host split, one SDPA call per sequence, a cat; kernel launches
per layer grow with the number of sequences), ``sdpa-dense`` (one SDPA call with a dense
(total, total) block-diagonal mask), ``flex`` (FlexAttention with a document mask, CUDA only),
``flash-attn`` (``flash_attn_varlen_func``, when importable) and ``triton`` (``mmkernels.attention_varlen``
forced to its Triton kernel: one launch per layer for the forward, rotary fused); forward only:
``triton-fp8`` (``fp8="dynamic"``: e4m3 operands, its own looser output bound, docs/fp8.md) and
``triton-scores`` (``return_scores=dict(query_index=None, reduce_heads="mean")``: the output is
checked, the scores computed with it). For packs of one sequence (``qwen25vl``'s full blocks,
``qwen3vl-tower``), the same attention through the dense API on (1, H, L, d): ``sdpa-flash``,
``sdpa-cudnn`` (SDPA pinned, RoPE in torch), ``dense-triton`` and ``dense-fp8``
(``mmkernels.attention``, rotary fused) — dense vs packed in one table.

``qwen3vl-tower`` (explicit, not in ``--preset all``): Qwen3-VL's ViT, 16 heads of 72, one image of
8,836 / 15,376 / 35,344 patches (94², 124², 188²) packed alone.

FLOPs: fwd = Σ over sequences of 4·Lq·Lk·d·H, halved when causal; fwd+bwd = 3.5 × fwd.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .cases import Backend, Bound, OpBench, ShapeSpec, Skip, as_bool, mk_backend, parse_kv
from .cases_attention import FP8_FWD_ONLY, MODE_FACTOR, _flex_why_not, _importable, fp8_out_rtol, sdpa_backend

__all__ = ["BENCH", "VarlenShape", "qwen25_window_lengths"]

CHECK_HEADS = 2
GRAD_CHECK_MAX = 1 << 24  # Σ L² · heads of the float64 gradient check
REF_CHUNK_BYTES = 256 << 20  # float64 scores per chunk of the reference without gradients


@dataclass(frozen=True)
class VarlenShape:
    """``seqlens`` packed sequences of (L_i, H, d) query/key/value tokens, attending within their own
    sequence (block-diagonal, causal within a block when ``causal``)."""

    seqlens: tuple[int, ...]
    H: int = 16
    d: int = 80
    causal: bool = False

    @property
    def total(self) -> int:
        return sum(self.seqlens)


def qwen25_window_lengths(height_px: int, width_px: int, patch: int = 14, merge: int = 2,
                          window_px: int = 112) -> tuple[int, ...]:
    """Qwen2.5-VL's window sizes (in patches) for one image: resized to multiples of patch·merge,
    windows tile the merged grid by window_px/(patch·merge) units (edge windows smaller)."""
    unit = patch * merge
    gh, gw = round(height_px / unit), round(width_px / unit)
    win = window_px // unit
    return tuple(min(win, gh - i) * min(win, gw - j) * merge * merge
                 for i in range(0, gh, win) for j in range(0, gw, win))


_WIN = qwen25_window_lengths(1000, 2500)
PRESETS: dict[str, list[ShapeSpec] | str] = {
    "qwen2vl": [ShapeSpec("qwen2vl", "vit-8img", "Qwen2-VL ViT: 8 packed images of 256-4096 patches, 16 heads x 80",
                          VarlenShape((256, 576, 1024, 1296, 2304, 3136, 4096, 784)))],
    "qwen25vl": [ShapeSpec("qwen25vl", "vit-windows", f"Qwen2.5-VL ViT windowed blocks: 1000x2500 px, {len(_WIN)} "
                           "windows of <= 64 tokens", VarlenShape(_WIN)),
                 ShapeSpec("qwen25vl", "vit-full", "Qwen2.5-VL ViT full blocks 7/15/23/31: the same image, one "
                           "sequence", VarlenShape((sum(_WIN),)))],
    # Qwen3-VL's ViT (16 heads x 72, full attention in every block): one image of 94^2 / 124^2 / 188^2
    # patches packed alone (B=1); not a default preset: `--preset qwen3vl-tower` (scripts/gpu_check.sh)
    "qwen3vl-tower": [ShapeSpec("qwen3vl-tower", f"vit-{S}", f"Qwen3-VL ViT: one {S}-token image "
                                f"({int(S ** 0.5)}^2 patches) packed alone, 16 heads x 72", VarlenShape((S,), d=72))
                      for S in (8836, 15376, 35344)],
    "blip2": "BLIP-2's EVA ViT runs fixed 257-token images: dense attention (`mmkernels bench attention`)",
    "instructblip": "InstructBLIP's EVA ViT runs fixed 257-token images: dense attention (`mmkernels bench attention`)",
    "llava15": "LLaVA-1.5's CLIP tower runs fixed 577-token images: dense attention (`mmkernels bench attention`)",
    "llava-ov": "LLaVA-OneVision's SigLIP runs fixed 729-token crops: dense attention (`mmkernels bench attention`)",
    "gemma3": "Gemma 3's SigLIP runs fixed 4096-token images: dense attention (`mmkernels bench attention`)",
    "internvl": "InternVL's InternViT runs fixed 1025-token tiles: dense attention (`mmkernels bench attention`)",
}


def _seg(cu, total, device):
    return torch.searchsorted(cu[1:], torch.arange(total, device=device, dtype=cu.dtype), right=True)


def _rope(q, k, rot):
    from mmkernels.reference.attention_varlen import apply_rotary

    return apply_rotary(q, *rot), apply_rotary(k, *rot)


def _hf_loop(s: VarlenShape):
    def fn(q, k, v, cu, rot):
        q, k = _rope(q, k, rot)
        lengths = (cu[1:] - cu[:-1]).tolist()  # the host sync transformers does
        outs = [F.scaled_dot_product_attention(a.transpose(0, 1)[None], b.transpose(0, 1)[None],
                                               c.transpose(0, 1)[None], is_causal=s.causal)[0].transpose(0, 1)
                for a, b, c in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return torch.cat(outs)
    return fn


def _dense(s: VarlenShape):
    def fn(q, k, v, cu, rot):
        q, k = _rope(q, k, rot)
        seg = _seg(cu, q.shape[0], q.device)
        mask = seg[:, None] == seg[None, :]
        if s.causal:
            mask = mask.tril()
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], attn_mask=mask)[0].transpose(0, 1)
    return fn


class _Flex:
    """One static ``torch.compile`` of flex_attention; the document block mask built once per shape."""

    def __init__(self):
        self.compiled, self.masks = None, {}

    def __call__(self, s: VarlenShape):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self.compiled is None:
            self.compiled = torch.compile(flex_attention, dynamic=False)

        def fn(q, k, v, cu, rot):
            key = (s, q.device)
            if key not in self.masks:
                seg = _seg(cu, q.shape[0], q.device)

                def doc(b, h, i, j):
                    same = seg[i] == seg[j]
                    return same & (j <= i) if s.causal else same
                self.masks[key] = create_block_mask(doc, None, None, q.shape[0], q.shape[0], device=q.device)
            q, k = _rope(q, k, rot)
            return self.compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                 block_mask=self.masks[key])[0].transpose(0, 1)
        return fn


def _flash_attn(s: VarlenShape):
    from flash_attn import flash_attn_varlen_func

    m = max(s.seqlens)

    def fn(q, k, v, cu, rot):
        q, k = _rope(q, k, rot)
        return flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=s.causal)
    return fn


def _mk(s: VarlenShape):
    import mmkernels

    m = max(s.seqlens)
    return lambda q, k, v, cu, rot: mmkernels.attention_varlen(q, k, v, cu, cu, max_seqlen_q=m, max_seqlen_k=m,
                                                               is_causal=s.causal, rotary=rot)


def _mk_fp8(s: VarlenShape):
    import mmkernels

    m = max(s.seqlens)
    return lambda q, k, v, cu, rot: mmkernels.attention_varlen(q, k, v, cu, cu, max_seqlen_q=m, max_seqlen_k=m,
                                                               is_causal=s.causal, rotary=rot, fp8="dynamic")


def _mk_scores(s: VarlenShape):
    import mmkernels

    m = max(s.seqlens)
    req = dict(query_index=None, reduce_heads="mean")
    # the output is checked; the (total,) scores are computed (and timed) with it
    return lambda q, k, v, cu, rot: mmkernels.attention_varlen(q, k, v, cu, cu, max_seqlen_q=m, max_seqlen_k=m,
                                                               is_causal=s.causal, rotary=rot,
                                                               return_scores=req)[0]


def _one_seq(s: VarlenShape, who: str) -> None:
    if len(s.seqlens) != 1:
        raise Skip(f"{who} times packs of one sequence only (the dense call of the same attention); "
                   "several sequences need a mask: sdpa-dense")


def _sdpa_one(s: VarlenShape):
    """One sequence as a dense (1, H, L, d) batch: RoPE in torch, SDPA unmasked (pinned by the context)."""
    _one_seq(s, "sdpa-flash / sdpa-cudnn")

    def fn(q, k, v, cu, rot):
        q, k = _rope(q, k, rot)
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], is_causal=s.causal)[0].transpose(0, 1)
    return fn


def _mk_dense(s: VarlenShape, **kw):
    """One sequence through the dense ``mmkernels.attention`` on (1, H, L, d), rotary fused."""
    import mmkernels

    _one_seq(s, "dense-triton / dense-fp8")

    def fn(q, k, v, cu, rot):
        return mmkernels.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                   is_causal=s.causal, rotary=rot, **kw)[0].transpose(0, 1)
    return fn


def _seqlens(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.replace("+", ":").split(":") if x)


class AttentionVarlenBench(OpBench):
    name = "attention_varlen"
    title = "mmkernels.attention_varlen (packed vision attention, rotary fused)"
    api = "attention_varlen"
    metric = "tflops"
    convention = ("fwd = sum over sequences of 4*Lq*Lk*d*H (QK^T and PV), halved when causal; fwd+bwd = 3.5 * fwd; "
                  "RoPE, softmax and masks not counted")
    presets = PRESETS
    baseline = "hf-loop"
    default_modes = ("fwd", "fwd+bwd")
    suite_backends = {"cpu": ("hf-loop", "sdpa-dense"), "cuda": ("hf-loop", "sdpa-dense", "flex", "triton")}
    grad_checked = ("q", "k", "v")

    def parse_shape(self, text):
        kv = parse_kv(text, {"seqlens": _seqlens, "H": int, "d": int, "causal": as_bool})
        if "seqlens" not in kv:
            raise ValueError(f"--shape {text!r}: missing seqlens (e.g. seqlens=256:1024:4096,H=16,d=80)")
        shape = VarlenShape(**kv)
        return ShapeSpec("custom", self.describe(shape).replace(" ", ","), "--shape " + text, shape)

    def scale_for_cpu(self, s, quick):
        # the mix of lengths is kept (windows of <= 64 stay whole, long images shrink), few sequences
        div, nseq, cap = (16, 4, 160) if quick else (4, 8, 640)
        return replace(s, seqlens=tuple(L if L <= 64 else min(cap, max(16, L // div)) for L in s.seqlens[:nseq]),
                       H=min(s.H, 2 if quick else 4))

    def describe(self, s):
        lens = s.seqlens if len(s.seqlens) <= 4 else f"{len(s.seqlens)} seqs {min(s.seqlens)}-{max(s.seqlens)}"
        lens = ":".join(map(str, lens)) if isinstance(lens, tuple) else lens
        return f"{lens} total={s.total} H={s.H} d={s.d}" + (" causal" if s.causal else "")

    def params(self, s):
        return {**super().params(s), "total": s.total, "n_seqs": len(s.seqlens)}

    def x(self, s):
        return s.total

    def backends(self):
        return {
            "hf-loop": Backend("hf-loop", "transformers' sdpa vision path: RoPE, host split, one SDPA per sequence, "
                               "cat (launches per layer grow with the sequences)", _hf_loop),
            "sdpa-dense": Backend("sdpa-dense", "one SDPA call with a dense (total, total) block-diagonal mask",
                                  _dense),
            "flex": Backend("flex", "torch.compile(flex_attention) with a document block mask", _Flex(),
                            _flex_why_not, gpu_kernel=True),
            "flash-attn": Backend("flash-attn", "flash_attn.flash_attn_varlen_func (RoPE in torch)", _flash_attn,
                                  _importable("flash_attn", "flash-attn"), gpu_kernel=True),
            "triton": mk_backend("attention_varlen", "triton", _mk,
                                 'mmkernels.attention_varlen(..., backend="triton"): one launch per layer, rotary '
                                 "fused"),
            "triton-fp8": replace(mk_backend("attention_varlen", "triton", _mk_fp8,
                                             'mmkernels.attention_varlen(..., fp8="dynamic"): e4m3 Q, K, V per head, '
                                             "rotary before quantisation, fp8 tensor cores (sm_89+)"),
                                  name="triton-fp8", fwd_only=FP8_FWD_ONLY, out_rtol=fp8_out_rtol()),
            "triton-scores": replace(mk_backend("attention_varlen", "triton", _mk_scores,
                                                "mmkernels.attention_varlen(..., return_scores=dict(query_index=None, "
                                                'reduce_heads="mean")): the output plus per-key attention received'),
                                     name="triton-scores", fwd_only="return_scores is forward only"),
            # a pack of one sequence is dense attention of a batch of one: the dense kernels, same inputs
            "sdpa-flash": sdpa_backend("sdpa-flash", "FLASH_ATTENTION", _sdpa_one,
                                       "one sequence: RoPE in torch, SDPA unmasked on (1, H, L, d), "
                                       "SDPBackend.FLASH_ATTENTION"),
            "sdpa-cudnn": sdpa_backend("sdpa-cudnn", "CUDNN_ATTENTION", _sdpa_one,
                                       "one sequence: RoPE in torch, SDPA unmasked on (1, H, L, d), "
                                       "SDPBackend.CUDNN_ATTENTION"),
            "dense-triton": replace(mk_backend("attention", "triton", _mk_dense,
                                               "one sequence: mmkernels.attention on (1, H, L, d), rotary fused"),
                                    name="dense-triton"),
            "dense-fp8": replace(mk_backend("attention", "triton", lambda s: _mk_dense(s, fp8="dynamic"),
                                            'one sequence: mmkernels.attention(..., fp8="dynamic") on (1, H, L, d)'),
                                 name="dense-fp8", fwd_only=FP8_FWD_ONLY, out_rtol=fp8_out_rtol()),
        }

    def make_inputs(self, s, dtype, device, generator):
        def rnd(*shape, scale=1.0):
            return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)

        cu = torch.tensor((0, *torch.tensor(s.seqlens).cumsum(0).tolist()), dtype=torch.int32, device=device)
        freqs = torch.randn(s.total, s.d // 2, generator=generator, device=device) * 3
        emb = torch.cat((freqs, freqs), -1)
        return {"q": rnd(s.total, s.H, s.d), "k": rnd(s.total, s.H, s.d), "v": rnd(s.total, s.H, s.d),
                "dout": rnd(s.total, s.H, s.d), "cu": cu, "cos": emb.cos(), "sin": emb.sin()}

    def bind(self, backend, s, inputs, grad):
        fn = backend.call(s)
        leaves = {n: inputs[n].detach().requires_grad_(grad) for n in ("q", "k", "v")}
        rot = (inputs["cos"], inputs["sin"])
        return Bound(lambda: fn(*leaves.values(), inputs["cu"], rot), leaves if grad else {},
                     inputs["dout"] if grad else None)

    def ref_slice(self, t):
        return t[:, :CHECK_HEADS]

    def reference(self, s, inputs, grad=False):
        """Per sequence, in float64, on the first heads (and q/k/v's gradients when small enough)."""
        nh = min(CHECK_HEADS, s.H)
        grad = grad and nh * sum(L * L for L in s.seqlens) <= GRAD_CHECK_MAX
        q, k, v = (inputs[n][:, :nh].double().requires_grad_(grad) for n in ("q", "k", "v"))
        rot = (inputs["cos"].double(), inputs["sin"].double())
        with torch.set_grad_enabled(grad):
            qr, kr = _rope(q, k, rot)
            outs = []
            for a, b, c in zip(qr.split(s.seqlens), kr.split(s.seqlens), v.split(s.seqlens)):
                # without gradients in query-row chunks of <= 256 MiB of scores (Qwen3-VL: 35k tokens)
                rows = a.shape[0] if grad else max(1, (REF_CHUNK_BYTES // 8) // max(1, nh * b.shape[0]))
                for i in range(0, a.shape[0], rows):
                    sc = torch.einsum("qhd,khd->hqk", a[i:i + rows], b) / s.d ** 0.5
                    if s.causal:
                        keep = (torch.arange(i, i + sc.shape[1], device=sc.device)[:, None]
                                >= torch.arange(b.shape[0], device=sc.device))
                        sc = sc.masked_fill(~keep, float("-inf"))
                    outs.append(torch.einsum("hqk,khd->qhd", sc.softmax(-1), c))
            out = torch.cat(outs)
        if not grad:
            return out.detach(), {}
        out.backward(inputs["dout"][:, :nh].double())
        return out.detach(), {n: t.grad for n, t in zip("qkv", (q, k, v))}

    def flops(self, s, mode):
        fwd = 4.0 * sum(L * L for L in s.seqlens) * s.d * s.H * (0.5 if s.causal else 1.0)
        return fwd * MODE_FACTOR[mode]


BENCH = AttentionVarlenBench()
