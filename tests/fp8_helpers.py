"""Torch references for the fp8 attention tests (tests/test_attention_fp8.py) and the accuracy
table of docs/fp8.md (``python tests/fp8_helpers.py``): float64 ground truth, inputs with
SigLIP-like outlier channels, e4m3 quantisation as the kernels do it, and a SageAttention2-style
emulation (int8 Q·Kᵀ with smoothed K, fp8 P·V) to compare against."""

from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn


def inputs(kind: str, shape_q, shape_kv, dtype=torch.bfloat16, seed=0, outlier_channels=(3, 17, 40)):
    """(q, k, v): ``random`` N(0, 1); ``outlier``: 0.3·N(0, 1) with a few head-dim channels of q and
    k ×20 (the few large channels of SigLIP / CLIP ViT activations; std 6 there, 0.3 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g, dtype=torch.float64)
    k = torch.randn(shape_kv, generator=g, dtype=torch.float64)
    v = torch.randn(shape_kv, generator=g, dtype=torch.float64)
    if kind == "outlier":
        ch = [c for c in outlier_channels if c < q.shape[-1]]
        q, k = q * 0.3, k * 0.3
        q[..., ch] *= 20
        k[..., ch] *= 20
    return q.to(dtype), k.to(dtype), v.to(dtype)


def quantize(x: torch.Tensor, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, fp32 descale) with amax over ``dims`` mapped to 448, as the kernels' pre-pass:
    x·(448/amax) in fp32, rounded to nearest even."""
    amax = x.float().abs().amax(dim=dims, keepdim=True)
    inv = torch.where(amax > 0, 448.0 / amax, torch.ones_like(amax))
    x8 = (x.float() * inv).clamp(-448, 448).to(E4M3)
    return x8, (amax / 448.0).squeeze(dims) if dims else amax / 448.0


def sdpa64(q, k, v, is_causal=False):
    """float64 SDPA over (B, H, L, D), GQA by repetition."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def sage_emulation(q, k, v, is_causal=False, block=64):
    """SageAttention2-style (B, H, L, D) forward in torch: Q per block of ``block`` rows and K per
    block of keys in int8 (amax/127), K smoothed first (its mean over the tokens subtracted, which
    shifts every logit of a row by the same amount), fp8 P·V with P scaled by 448 and V per
    channel in e4m3; softmax statistics in float64."""
    q, k, v = q.double(), k.double(), v.double()
    if k.shape[1] != q.shape[1]:
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    d = q.shape[-1]
    k = k - k.mean(dim=-2, keepdim=True)

    def int8_blocks(x):
        out = torch.empty_like(x)
        for s in range(0, x.shape[-2], block):
            t = x[..., s:s + block, :]
            sc = t.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-30) / 127.0
            out[..., s:s + block, :] = torch.round(t / sc).clamp(-127, 127) * sc
        return out

    s = int8_blocks(q) @ int8_blocks(k).transpose(-1, -2) / math.sqrt(d)
    if is_causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    row_sum = p.sum(-1, keepdim=True)
    p8 = (p * 448).to(E4M3).double() / 448
    vs = v.abs().amax(dim=-2, keepdim=True).clamp_min(1e-30) / 448
    v8 = (v / vs).to(E4M3).double() * vs
    return (p8 @ v8) / row_sum


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, cosine similarity) of ``out`` against ``ref``, flattened, in float64."""
    o, r = out.double().flatten(), ref.double().flatten()
    return (o - r).abs().max().item(), torch.nn.functional.cosine_similarity(o, r, dim=0).item()


def accuracy_table(shape=(2, 4, 256, 72), is_causal=False):
    """{kind: {method: (max err, cosine)}} vs float64 for the docs' table (interpreter on CPU)."""
    import mmkernels as mk

    b, h, length, d = shape
    table = {}
    for kind in ("random", "outlier"):
        q, k, v = inputs(kind, shape, shape)
        ref = sdpa64(q, k, v, is_causal)
        rows = {}
        rows["fp8 dynamic (per batch·head)"] = errors(mk.attention(q, k, v, is_causal=is_causal, fp8="dynamic"), ref)
        (q8, qd), (k8, kd), (v8, vd) = (quantize(x, (-2, -1)) for x in (q, k, v))
        rows["fp8 explicit per-head descales"] = errors(
            mk.attention(q8, k8, v8, is_causal=is_causal, fp8=dict(q_descale=qd, k_descale=kd, v_descale=vd)), ref)
        (q8, qd), (k8, kd), (v8, vd) = (quantize(x, (0, 1, 2, 3)) for x in (q, k, v))
        rows["fp8 explicit per-tensor descales"] = errors(
            mk.attention(q8, k8, v8, is_causal=is_causal, fp8=dict(q_descale=qd.reshape(()), k_descale=kd.reshape(()),
                                                                   v_descale=vd.reshape(()))), ref)
        rows["bf16 (mk.attention, Triton)"] = errors(mk.attention(q, k, v, is_causal=is_causal, backend="triton"), ref)
        rows["int8 QK / fp8 PV emulation (SageAttention2-style)"] = errors(sage_emulation(q, k, v, is_causal), ref)
        table[kind] = rows
    return table


if __name__ == "__main__":  # pragma: no cover - the docs' table
    import os
    import sys

    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, os.path.dirname(__file__))
    import _interpreter_fp8
    import _interpreter_rounding

    _interpreter_rounding.install()
    _interpreter_fp8.install()
    shape = tuple(int(x) for x in sys.argv[1:5]) if len(sys.argv) >= 5 else (2, 4, 256, 72)
    for causal in (False, True):
        for kind, rows in accuracy_table(shape, causal).items():
            for name, (err, cos) in rows.items():
                print(f"| {shape} | {'causal' if causal else 'full'} | {kind} | {name} | {err:.4f} | {cos:.6f} |")
