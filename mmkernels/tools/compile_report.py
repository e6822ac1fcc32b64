"""What a GPU would run, compiled on a machine without one: ``mmkernels inspect``.

Triton compiles for a CUDA target with no GPU present (ptxas ships with it), but the code a
GPU runs depends on the *launch specialisation*: at a real launch the JIT turns integer
arguments equal to 1 (contiguous last-dim strides) into constants and marks 16-divisible
integers and 16-byte-aligned pointers (``tt.divisibility``).  Without that, bf16 loads are
never vectorised and the pipeliner emits no ``cp.async`` — a compile that skips it shows only
that the code compiles.  So this module makes each launch the way the library does:

1. it calls the kernels' own launchers (``attention_forward``/``attention_backward``,
   ``varlen_forward``/``varlen_backward`` of the packed kernels, ``qformer_forward``, the
   token-pool ``forward``/``backward``) at the model shapes of DESIGN.md, on CPU tensors with
   the strides and alignment the CUDA tensors would have, inside
   :func:`mmkernels.kernels._launch.capture_launches`, which records each ``kernel[grid](...)``
   call (arguments, and every configuration the autotuner would try) instead of running it;
2. it binds each recorded call with the JIT's own binder (``create_function_from_signature``
   + ``JITFunction._pack_args``: the signature, constexprs and divisibility attributes a real
   launch computes) and compiles that for ``GPUTarget("cuda", arch, 32)``;
3. it reads the result: registers and stack (spill) bytes from ``cuobjdump
   --dump-resource-usage`` of the cubin, shared memory from the metadata, and from the PTX the
   tensor-core instructions (``wgmma.mma_async``, ``mma.sync``), asynchronous copies
   (``cp.async`` by size, TMA ``cp.async.bulk.tensor``) and global loads (vector ``ld.global.v2/v4``
   vs scalar, with the sub-4-byte scalar loads counted apart: a bf16 tile loaded 2 bytes at a time).
   From the SASS (``cuobjdump -sass``): each loop's instructions per iteration and its selects
   (``FSEL``: mask work), FMAs, exp2s and tensor-core ops (``loops``; summary column "loop
   SASS(FSEL)", e.g. the forward's interior and edge key loops).

It must run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels); the tests run
it in a child process.  Counts are static PTX instructions (an unrolled loop body counts once
per unrolled copy), not executed ones.

    from mmkernels.tools.compile_report import compile_report
    rows = compile_report(arch=90, head_dims=[72], configs="default")
    rows[0]["kernel"], rows[0]["registers"], rows[0]["cp_async"], rows[0]["compiled"].asm["ptx"]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

__all__ = ["ATTENTION_PRESETS", "QFORMER_PRESETS", "TOKEN_POOL_PRESETS", "VARIANTS", "VARLEN_PRESETS",
           "compile_report", "format_summary", "main"]

#: shared memory an sm_90 block may use (227 KB); sm_80: 163 KB
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@dataclass(frozen=True)
class AttnPreset:
    name: str
    B: int
    H: int
    Lq: int
    Lk: int
    d: int


#: DESIGN.md's real shapes (one per head dim first: the CI set), then the rest
ATTENTION_PRESETS = (
    AttnPreset("clip-l336", 16, 16, 577, 577, 64),
    AttnPreset("siglip-so400m", 16, 16, 729, 729, 72),
    AttnPreset("qwen2-vl", 1, 16, 4096, 4096, 80),  # packed images: one 4k-token image
    AttnPreset("eva-vit-g", 32, 16, 257, 257, 88),
    AttnPreset("d128-16k", 1, 16, 16384, 16384, 128),
    AttnPreset("internvit", 8, 16, 1025, 1025, 64),
    AttnPreset("gemma3-siglip", 4, 16, 4096, 4096, 72),
    AttnPreset("blip2-qformer-cross", 32, 12, 32, 257, 64),  # the Q-Former backward runs these kernels
)


@dataclass(frozen=True)
class VarlenPreset:
    """A packing of the packed (varlen) kernels: H heads of dim d, self-attention sequences of
    ``lengths`` tokens (Lq = Lk each), q/k/v views of one fused (total, 3, H, d) qkv projection
    as the Qwen-VL vision blocks make them, the vision RoPE applied in the kernel when
    ``rotary`` ((total, d) fp32 cos/sin, as HF builds them), ``hint`` the max_seqlen hint."""

    name: str
    H: int
    d: int
    lengths: tuple
    rotary: bool = False
    hint: int | None = None


# three images of 448x448, ~840x1120 and 672x560 px (14-px patches): 6304 tokens
_IMAGES = (1024, 3600, 1680)
# Qwen2.5-VL window attention: 112-px windows (64 patches), ragged windows at the image edges
_WINDOWS = (64,) * 80 + (32,) * 10 + (16,) * 2

#: packed-attention packings (the Qwen-VL vision towers first: the CI set), then one per other head dim
VARLEN_PRESETS = (
    VarlenPreset("qwen2-vl-packed", 16, 80, _IMAGES, rotary=True),
    VarlenPreset("qwen2.5-vl-windows", 16, 80, _WINDOWS, rotary=True),
    VarlenPreset("varlen-d64", 16, 64, _IMAGES),
    VarlenPreset("varlen-d72", 16, 72, _IMAGES),
    VarlenPreset("varlen-d88", 16, 88, _IMAGES),
    VarlenPreset("varlen-d128", 16, 128, _IMAGES),
)


@dataclass(frozen=True)
class QFormerPreset:
    name: str
    B: int
    Lq: int
    Lk: int
    Dq: int
    Dkv: int
    H: int


QFORMER_PRESETS = (QFormerPreset("blip2", 64, 32, 257, 768, 1408, 12),)


@dataclass(frozen=True)
class PoolPreset:
    name: str
    B: int
    h: int
    w: int
    C: int
    mode: str
    k: int
    out: int  # output grid side
    has_cls: bool
    norm: str | None


TOKEN_POOL_PRESETS = (
    PoolPreset("gemma3", 4, 64, 64, 1152, "avg", 4, 16, False, "rmsnorm"),
    PoolPreset("llava-ov", 16, 27, 27, 1152, "bilinear", 2, 14, False, None),
    PoolPreset("internvl", 8, 32, 32, 1024, "merge", 2, 16, True, "layernorm"),
    PoolPreset("llava-video", 16, 24, 24, 1024, "max", 2, 12, False, None),
)

#: attention variants: (mask, dropout_p, is_causal); "mask" is a (B, 1, 1, Lk) bool padding mask
VARIANTS = {
    "plain": (False, 0.0, False),
    "mask": (True, 0.0, False),
    "dropout": (False, 0.1, False),
    "mask+dropout": (True, 0.1, False),
    "causal": (False, 0.0, True),
    # the dense attention with RoPE (``mk.attention(rotary=(cos, sin))``: Q and K rotated once by
    # ``rotary.rotate``, then the plain loops): fp32 cos/sin (L, D) shared by the batch; other
    # families run it as "plain"
    "rotary": (False, 0.0, False),
}

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
           # the fp8 (e4m3) inference forward: bf16 inputs through ``fp8="dynamic"`` (the quantising
           # pre-pass, then the forward with FP8=True); attention families only, no dropout
           "fp8": torch.float8_e4m3fn}


# ------------------------------------------------------------------------------------------
# representative calls: each runs the library's launchers (captured) and says, per kernel,
# the FLOPs and bytes one call of it moves
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Case:
    family: str
    preset: str
    variant: str
    head_dim: int
    run: Callable[[], None]
    model: dict  # kernel name -> (flops, bytes) of one call


def _attention_case(p: AttnPreset, variant: str, dtype: torch.dtype) -> _Case:
    from ..kernels import attention as A
    from ..kernels import attention_scores as S

    use_mask, drop, causal = VARIANTS[variant]
    esz = torch.empty((), dtype=dtype).element_size()

    def run() -> None:
        if dtype == torch.float8_e4m3fn:
            return _fp8_dense(p, variant)
        q = torch.empty(p.B, p.H, p.Lq, p.d, dtype=dtype)
        k = torch.empty(p.B, p.H, p.Lk, p.d, dtype=dtype)
        v = torch.empty_like(k)
        mask = torch.ones(p.B, 1, 1, p.Lk, dtype=torch.bool) if use_mask else None
        seed = torch.zeros(1, dtype=torch.int64)
        scale = p.d ** -0.5
        rot = {}
        if variant == "rotary":
            rot = dict(cos=torch.empty(max(p.Lq, p.Lk), p.d), sin=torch.empty(max(p.Lq, p.Lk), p.d))
        out, lse = A.attention_forward(q, k, v, mask, seed, drop, causal, scale, **rot)
        A.attention_backward(torch.empty_like(out), q, k, v, out, lse, mask, seed, drop, causal, scale, **rot)
        if not drop and not rot:  # token pruning (FastV / VisionZip): the mass each key gets from the last query row
            rows = torch.full((p.B, 1), p.Lq - 1, dtype=torch.int64)
            S.attention_scores(q, k, rows, None, mask, causal, scale)

    bh, lq, lk, d = p.B * p.H, p.Lq, p.Lk, p.d
    frac = 0.5 if causal else 1.0
    qd, kd = bh * lq * d * esz, bh * lk * d * esz
    model = {
        "attention.fwd": (4.0 * bh * lq * lk * d * frac, 2 * qd + 2 * kd + 8 * bh * lq),
        # S and dP recomputed, dV and dK: four products; Q, dO read, K, V read and dK, dV written
        "attention.dkdv": (8.0 * bh * lq * lk * d * frac, 2 * qd + 4 * kd + 12 * bh * lq),
        "attention.dq": (6.0 * bh * lq * lk * d * frac, 3 * qd + 2 * kd + 12 * bh * lq),
        "attention.preprocess": (2.0 * bh * lq * d, 2 * qd + 4 * bh * lq),
        # one selected query row: its logits against every key (twice: statistics, then column sums)
        "attention_scores.stats": (2.0 * bh * lk * d, kd + 8 * bh),
        "attention_scores.colsum": (2.0 * bh * lk * d, kd + 4 * bh * lk),
        # Q or K read and its rotated copy written (or dQ / dK rotated back in place), fp32 cos/sin
        "rotary.rotate": (None, 2 * qd + 8 * max(lq, lk) * d),
        "rotary.unrotate": (None, 2 * qd + 8 * max(lq, lk) * d),
    }
    return _Case("attention", p.name, variant, d, run, model)


def _varlen_case(p: VarlenPreset, variant: str, dtype: torch.dtype) -> _Case:
    from ..kernels import attention_varlen as V

    _, drop, causal = VARIANTS[variant]
    esz = torch.empty((), dtype=dtype).element_size()
    total = sum(p.lengths)

    def run() -> None:
        if dtype == torch.float8_e4m3fn:
            return _fp8_packed(p, variant)
        q, k, v = torch.empty(total, 3, p.H, p.d, dtype=dtype).unbind(1)  # views of the fused qkv
        cu = torch.tensor([0, *itertools.accumulate(p.lengths)], dtype=torch.int32)
        cos = sin = torch.empty(total, p.d, dtype=torch.float32) if p.rotary else None
        seed = torch.zeros(1, dtype=torch.int64)
        scale = p.d ** -0.5
        out, lse = V.varlen_forward(q, k, v, cu, cu, cos, sin, seed, p.hint, p.hint, drop, causal, scale)
        V.varlen_backward(torch.empty_like(out), q, k, v, out, lse, cu, cu, cos, sin, seed, p.hint, p.hint, drop,
                          causal, scale)

    frac = 0.5 if causal else 1.0
    pairs = p.H * sum(n * n for n in p.lengths)  # (query, key) pairs over heads and sequences
    qd = p.H * total * p.d * esz
    rot = 2 * 4 * total * p.d if p.rotary else 0  # fp32 cos and sin
    model = {
        "attention_varlen.fwd": (4.0 * pairs * p.d * frac, 4 * qd + 8 * p.H * total),
        "attention_varlen.dkdv": (8.0 * pairs * p.d * frac, 6 * qd + 12 * p.H * total),
        "attention_varlen.dq": (6.0 * pairs * p.d * frac, 5 * qd + 12 * p.H * total),
        "attention.preprocess": (2.0 * p.H * total * p.d, 2 * qd + 4 * p.H * total),
        "rotary.rotate": (None, 2 * qd + rot),
        "rotary.unrotate": (None, 2 * qd + rot),
    }
    return _Case("attention_varlen", p.name, variant, p.d, run, model)


def _fp8_dense(p: AttnPreset, variant: str) -> None:
    """``mk.attention(q, k, v, fp8="dynamic")`` on bf16 (B, H, L, D) inputs: the pre-pass, then the
    e4m3 forward."""
    from ..kernels import _fp8 as F8
    from ..kernels import attention_fp8 as AF

    use_mask, _, causal = VARIANTS[variant]
    q = torch.empty(p.B, p.H, p.Lq, p.d, dtype=torch.bfloat16)
    k = torch.empty(p.B, p.H, p.Lk, p.d, dtype=torch.bfloat16)
    v = torch.empty_like(k)
    mask = torch.ones(p.B, 1, 1, p.Lk, dtype=torch.bool) if use_mask else None
    rot = (torch.empty(p.Lq, p.d), torch.empty(p.Lq, p.d)) if variant == "rotary" and p.Lq == p.Lk else (None, None)
    q8, qd = F8.quantize_dynamic(q, *rot)
    k8, kd = F8.quantize_dynamic(k, *rot)
    v8, vd = F8.quantize_dynamic(v)
    desc = AF.descale_rows(qd.view(p.B, -1), kd.view(p.B, -1), vd.view(p.B, -1), (p.B,))
    AF.attention_forward_fp8(q8, k8, v8, desc, mask, causal, p.d ** -0.5, torch.bfloat16)


def _fp8_packed(p, variant: str) -> None:
    """``mk.attention_varlen(q, k, v, ..., fp8="dynamic")`` on bf16 views of a fused qkv."""
    from ..kernels import _fp8 as F8
    from ..kernels import attention_fp8 as AF

    _, _, causal = VARIANTS[variant]
    total = sum(p.lengths)
    q, k, v = torch.empty(total, 3, p.H, p.d, dtype=torch.bfloat16).unbind(1)
    cu = torch.tensor([0, *itertools.accumulate(p.lengths)], dtype=torch.int32)
    rot = (torch.empty(total, p.d), torch.empty(total, p.d)) if p.rotary else (None, None)

    def hf(x):
        return x.transpose(0, 1).unsqueeze(0)

    q8, qd = F8.quantize_dynamic(hf(q), *rot)
    k8, kd = F8.quantize_dynamic(hf(k), *rot)
    v8, vd = F8.quantize_dynamic(hf(v))
    desc = AF.descale_rows(qd, kd, vd, ())
    AF.varlen_forward_fp8(*(x[0].transpose(0, 1) for x in (q8, k8, v8)), desc, cu, cu, p.hint, p.hint, causal,
                          p.d ** -0.5, torch.bfloat16)


def _qformer_case(p: QFormerPreset, variant: str, dtype: torch.dtype) -> _Case:
    from ..kernels import qformer_cross_attention as Q

    use_mask, drop, _ = VARIANTS[variant]
    esz = torch.empty((), dtype=dtype).element_size()
    d = p.Dq // p.H

    def run() -> None:
        x = torch.empty(p.B, p.Lq, p.Dq, dtype=dtype)
        enc = torch.empty(p.B, p.Lk, p.Dkv, dtype=dtype)
        wq, bq = torch.empty(p.Dq, p.Dq, dtype=dtype), torch.empty(p.Dq, dtype=dtype)
        wk, bk = torch.empty(p.Dq, p.Dkv, dtype=dtype), torch.empty(p.Dq, dtype=dtype)
        wv, bv = torch.empty_like(wk), torch.empty_like(bk)
        # the op turns a (B, Lk) keep-mask into a broadcastable (B, 1, 1, Lk) bool mask
        mask = torch.ones(p.B, 1, 1, p.Lk, dtype=torch.bool) if use_mask else None
        seed = torch.zeros(1, dtype=torch.int64)
        Q.qformer_forward(x, enc, wq, bq, wk, bk, wv, bv, mask, seed, p.H, drop, d ** -0.5)

    flops = 2.0 * p.B * p.Lq * p.Dq * p.Dq + 4.0 * p.B * p.Lk * p.Dkv * p.Dq + 4.0 * p.B * p.Lq * p.Lk * p.Dq
    nbytes = esz * (2 * p.B * p.Lq * p.Dq + p.B * p.Lk * p.Dkv + p.Dq * p.Dq + 2 * p.Dq * p.Dkv) + 8 * p.B * p.H * p.Lq
    return _Case("qformer_cross_attention", p.name, variant, d, run, {"qformer_cross_attention.fwd": (flops, nbytes)})


def _token_pool_case(p: PoolPreset, dtype: torch.dtype) -> _Case:
    from ..kernels import token_pool as T

    esz = torch.empty((), dtype=dtype).element_size()
    k = 1 if p.mode == "bilinear" else p.k  # bilinear: no window, the output size sets the taps
    spec = T.TokenPoolSpec(p.h, p.w, p.mode, k, k, k, k, p.out, p.out, has_cls=p.has_cls, keep_cls=False,
                           norm=p.norm)
    c_out = spec.c_out(p.C)

    def run() -> None:
        x = torch.empty(p.B, spec.n_in, p.C, dtype=dtype)
        weight = torch.empty(c_out, dtype=dtype) if p.norm else None
        bias = torch.empty(c_out, dtype=dtype) if p.norm == "layernorm" else None
        out, saved = T.forward(x, spec, weight, bias)
        T.backward(torch.empty_like(out), x, spec, weight, bias, saved)

    x_bytes = p.B * spec.n_in * p.C * esz
    o_bytes = p.B * spec.n_out * c_out * esz
    model = {
        "token_pool.fwd": (None, x_bytes + o_bytes),
        "token_pool.norm_bwd": (None, 2 * o_bytes + 4 * p.B * spec.n_out * c_out),
        "token_pool.bwd": (None, o_bytes + x_bytes),
    }
    return _Case("token_pool", p.name, "-", p.C, run, model)


def _kernel_names() -> dict:
    from ..kernels import _fp8 as F8
    from ..kernels import _rotary as R
    from ..kernels import attention as A
    from ..kernels import attention_scores as S
    from ..kernels import attention_varlen as V
    from ..kernels import qformer_cross_attention as Q
    from ..kernels import token_pool as T

    return {
        S._scores_stats: "attention_scores.stats", S._scores_colsum: "attention_scores.colsum",
        A._attn_fwd: "attention.fwd", A._attn_bwd_dkdv: "attention.dkdv", A._attn_bwd_dq: "attention.dq",
        A._attn_bwd_preprocess: "attention.preprocess", Q._qformer_fwd: "qformer_cross_attention.fwd",
        V._varlen_fwd: "attention_varlen.fwd", V._varlen_bwd_dkdv: "attention_varlen.dkdv",
        V._varlen_bwd_dq: "attention_varlen.dq", R._rotary_unrotate: "rotary.unrotate",
        R._rotary_rotate: "rotary.rotate", F8._fp8_quant: "fp8.quant",
        T._token_pool_fwd: "token_pool.fwd", T._token_pool_norm_bwd: "token_pool.norm_bwd",
        T._token_pool_bwd: "token_pool.bwd",
    }


# ------------------------------------------------------------------------------------------
# binding and compiling a recorded launch the way the JIT does
# ------------------------------------------------------------------------------------------
def _bind(fn, backend, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) a launch ``fn[grid](*args, **kwargs)`` compiles
    with: triton's own binder and ``_pack_args`` (triton 3.6 to 3.9 share both; they are
    internal, so a triton without them is named in the error rather than approximated)."""
    from triton.runtime import jit

    if not hasattr(jit, "create_function_from_signature") or not hasattr(fn, "_pack_args"):
        import triton

        raise RuntimeError(f"triton {triton.__version__}: no JIT binder (create_function_from_signature / "
                           "JITFunction._pack_args, present in 3.6-3.9); cannot reproduce a launch's specialisation")
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def _compile(fn, args: tuple, kwargs: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    signature, constexprs, attrs, options = _bind(fn, backend, args, kwargs)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    return compiled, signature, attrs


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack bytes) from ``cuobjdump --dump-resource-usage``.  Triton
    kernels make no calls and no local arrays, so their stack frame is register spills."""
    exe = _tool("cuobjdump")
    if exe is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([exe, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return (int(reg.group(1)) if reg else None), (int(stack.group(1)) if stack else None)


_SASS_INS = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", re.M)
_SASS_BACK_BRANCH = re.compile(r"\bBRA (0x[0-9a-f]+)")


def _sass_loops(cubin: bytes, min_instructions: int = 64) -> list[dict]:
    """The kernel's loops in SASS (a backward branch closes one), in address order: per loop the
    instructions of one iteration and, among them, the selects (``FSEL``: masks), ``FFMA``,
    ``FMUL``, ``MUFU.EX2`` (exp2) and tensor-core ops (``HGMMA``: wgmma, ``HMMA``: mma.sync).
    Loops shorter than ``min_instructions`` (address arithmetic, barriers' spin loops) are left out."""
    exe = _tool("cuobjdump")
    if exe is None:
        return []
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([exe, "-sass", f.name], capture_output=True, text=True).stdout
    ins = [(int(a, 16), t) for a, t in _SASS_INS.findall(sass)]
    loops = []
    for addr, text in ins:
        m = _SASS_BACK_BRANCH.search(text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
        if len(body) < min_instructions:
            continue

        def count(pat, body=body):
            return sum(1 for t in body if re.search(pat, t))

        loops.append(dict(instructions=len(body), fsel=count(r"\bFSEL\b"), ffma=count(r"\bFFMA\b"),
                          fmul=count(r"\bFMUL\b"), ex2=count(r"MUFU\.EX2"), hgmma=count(r"\bHGMMA\b"),
                          hmma=count(r"\bHMMA\b")))
    return loops


_LD = re.compile(r"\bld\.global((?:\.[\w:]+)*)\s")
_CP_ASYNC = re.compile(  # cp.async.{ca,cg}.shared.global [dst], [src], size
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_WIDTH = re.compile(r"^[busf](8|16|32|64|128)$")


def _ptx_stats(ptx: str) -> dict:
    vec = scalar = narrow = 0
    for m in _LD.finditer(ptx):
        mods = m.group(1).split(".")[1:]
        lanes = next((int(t[1:]) for t in mods if re.fullmatch(r"v\d", t)), 1)
        bits = next((int(w.group(1)) for t in mods if (w := _WIDTH.match(t))), 32)
        if lanes > 1:
            vec += 1
        else:
            scalar += 1
            narrow += bits < 32
    sizes: dict[int, int] = {}
    for m in _CP_ASYNC.finditer(ptx):
        n = int(m.group(1), 0)
        sizes[n] = sizes.get(n, 0) + 1
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync\.aligned", ptx)),
        "cp_async": sum(sizes.values()),
        "cp_async_16": sizes.get(16, 0),
        "cp_async_sizes": dict(sorted(sizes.items())),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "ld_vector": vec,
        "ld_scalar": scalar,
        "ld_scalar_narrow": narrow,
    }


def _config_dict(cfg, kwargs: dict) -> dict:
    if cfg is None:
        keys = [k for k in kwargs if k.startswith("BLOCK")]
        out = {k: kwargs[k] for k in keys}
        out["num_warps"] = kwargs.get("num_warps", 4)
        out["num_stages"] = kwargs.get("num_stages", 3)
        return out
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _cases(dtype: torch.dtype, presets, head_dims, variants, families) -> list[_Case]:
    cases = []
    if dtype == torch.float8_e4m3fn:  # the fp8 forward: attention families, no dropout
        families = families & {"attention", "attention_varlen"}
        variants = [v for v in variants if not VARIANTS[v][1]]
    if "attention" in families:
        for p in ATTENTION_PRESETS:
            if (presets and p.name not in presets) or (head_dims and p.d not in head_dims):
                continue
            if not presets and not head_dims and p.name in ("internvit", "gemma3-siglip"):
                continue  # same specialisation as clip-l336 / siglip-so400m up to length divisibility
            cases += [_attention_case(p, v, dtype) for v in variants]
    if "attention_varlen" in families:
        for p in VARLEN_PRESETS:
            if (presets and p.name not in presets) or (head_dims and p.d not in head_dims):
                continue
            # no user masks in the packed op: the cu_seqlens blocks are its mask
            cases += [_varlen_case(p, v, dtype) for v in variants if not VARIANTS[v][0]]
    if "qformer_cross_attention" in families:
        for p in QFORMER_PRESETS:
            if not presets or p.name in presets:
                cases += [_qformer_case(p, v, dtype) for v in variants if not VARIANTS[v][2]]
    if "token_pool" in families:
        for p in TOKEN_POOL_PRESETS:
            if not presets or p.name in presets:
                cases.append(_token_pool_case(p, dtype))
    return cases


def compile_report(arch: int = 90, *, dtype: str = "bf16", kernels: Iterable[str] | None = None,
                   presets: Iterable[str] | None = None, head_dims: Iterable[int] | None = None,
                   variants: Iterable[str] = ("plain",), configs: str = "all",
                   progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Compile every kernel launch the library makes at the preset shapes, for ``sm_{arch}``.

    ``kernels``: names or prefixes ("attention" — with "attention_scores" and
    "attention_varlen" —, "attention.fwd", "attention_varlen", "qformer_cross_attention", "token_pool";
    the aliases of ``KERNEL_ALIASES``: "qformer", "qformer.fwd");
    ``presets``: names from ``ATTENTION_PRESETS`` / ``VARLEN_PRESETS`` / ``QFORMER_PRESETS`` /
    ``TOKEN_POOL_PRESETS`` (default: one attention preset per head dim, every packing, the
    Q-Former, every pooling preset);
    ``head_dims``: attention presets with these head dims; ``variants``: keys of ``VARIANTS``;
    ``configs``: "all" (every candidate the autotuner would try), "default" (the first: what
    runs untuned, ``MMKERNELS_AUTOTUNE=0``) or "tma" (the tensor-descriptor candidates, config
    ``USE_TMA``, that the attention launchers add when the operands allow TMA).

    Returns one dict per (launch, configuration): ``kernel``, ``family``, ``preset``,
    ``variant``, ``dtype``, ``head_dim``, ``config`` (tiles, num_warps, num_stages),
    ``default`` (first candidate), ``compiled`` (triton's ``CompiledKernel``, None on failure),
    ``error``, ``registers``, ``spill_bytes``, ``shared_bytes``, ``wgmma``, ``mma_sync``,
    ``cp_async`` (``cp_async_16``: 16-byte copies), ``tma``, ``ld_vector``, ``ld_scalar``,
    ``ld_scalar_narrow`` (scalar loads under 4 bytes), ``flops``, ``bytes`` (one call's
    arithmetic and ideal DRAM traffic; None where not modelled), ``specialization`` (the
    arguments marked 16-divisible or constant by the binder) and ``compile_s``.
    """
    from .._utils import interpreting

    if interpreting():
        raise RuntimeError("compile_report: TRITON_INTERPRET is set, so the kernels are interpreted Python; "
                           "run it in a process without it (mmkernels inspect does)")
    rows: list[dict] = []
    for case, launch, name, i, cfg in _launches(arch, dtype=dtype, kernels=kernels, presets=presets,
                                                head_dims=head_dims, variants=variants, configs=configs):
        kwargs = dict(launch.kwargs)
        if cfg is not None:
            kwargs.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        row = _row(case, launch, name, i, cfg, dtype, arch)
        t0 = time.perf_counter()
        try:
            compiled, signature, attrs = _compile(launch.fn, launch.args, kwargs, arch)
        except Exception as exc:  # report every launch; the caller decides what fails
            row["error"] = f"{type(exc).__name__}: {str(exc)[-2000:]}"
        else:
            row["compiled"] = compiled
            row["registers"], row["spill_bytes"] = _resources(compiled.asm["cubin"])
            row["loops"] = _sass_loops(compiled.asm["cubin"])
            row["shared_bytes"] = compiled.metadata.shared
            row.update(_ptx_stats(compiled.asm["ptx"]))
            row["specialization"] = _specialization(launch.fn, signature, attrs)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def plan(arch: int = 90, *, dtype: str = "bf16", kernels: Iterable[str] | None = None,
         presets: Iterable[str] | None = None, head_dims: Iterable[int] | None = None,
         variants: Iterable[str] = ("plain",), configs: str = "all") -> list[dict]:
    """The rows :func:`compile_report` would compile with these arguments (``kernel``, ``family``,
    ``preset``, ``variant``, ``dtype``, ``head_dim``, ``config``, ``default``, ``flops``,
    ``bytes``), without compiling: the launches are captured, which takes about a second for the
    default selection. ``mmkernels inspect`` says up front how many compiles it will run."""
    return [_row(case, launch, name, i, cfg, dtype, arch)
            for case, launch, name, i, cfg in _launches(arch, dtype=dtype, kernels=kernels, presets=presets,
                                                        head_dims=head_dims, variants=variants, configs=configs)]


#: kernel-name prefixes whose launches come from other families' calls (the RoPE passes of the
#: dense and the packed attention: rotating Q and K, rotating dQ and dK back)
_KERNEL_FAMILIES = {"rotary": ("attention", "attention_varlen")}

#: other names ``kernels`` / ``--kernel`` accept for a family: ``qformer``, the Q-Former
#: cross-attention's name before it took the op's (``qformer.fwd`` is ``qformer_cross_attention.fwd``)
KERNEL_ALIASES = {"qformer": "qformer_cross_attention"}


def _canonical(kernels: Iterable[str] | None) -> list[str]:
    """``kernels`` with an alias of :data:`KERNEL_ALIASES` in front spelled by the family's name."""
    return [KERNEL_ALIASES.get(family, family) + dot + rest
            for family, dot, rest in (k.partition(".") for k in kernels or [])]


def selection_errors(*, dtype: str = "bf16", kernels: Iterable[str] | None = None,
                     presets: Iterable[str] | None = None, head_dims: Iterable[int] | None = None,
                     variants: Iterable[str] = ("plain",), configs: str = "all") -> list[str]:
    """What is wrong with a selection (unknown kernel, preset, head dim, variant, dtype or configs),
    each message naming the valid values; empty when it is fine."""
    errors = []
    if dtype not in _DTYPES:
        errors.append(f"dtype: got {dtype!r}, expected one of {sorted(_DTYPES)}")
    if configs not in ("all", "default", "tma"):
        errors.append(f"configs: got {configs!r}, expected 'all', 'default' or 'tma'")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        errors.append(f"variant: unknown {', '.join(map(repr, bad))}; expected some of {', '.join(VARIANTS)}")
    known = sorted(set(_kernel_names().values()))
    bad = [k for k, c in zip(kernels or [], _canonical(kernels)) if not any(n.startswith(c) for n in known)]
    if bad:
        errors.append(f"kernel: unknown {', '.join(map(repr, bad))}; expected a name or a prefix of one: "
                      + ", ".join(known))
    groups = {"attention": ATTENTION_PRESETS, "attention_varlen": VARLEN_PRESETS,
              "qformer_cross_attention": QFORMER_PRESETS, "token_pool": TOKEN_POOL_PRESETS}
    bad = [p for p in presets or [] if not any(p == q.name for g in groups.values() for q in g)]
    if bad:
        errors.append(f"preset: unknown {', '.join(map(repr, bad))}; expected one of: "
                      + "; ".join(f"{f}: {', '.join(q.name for q in g)}" for f, g in groups.items()))
    dims = sorted({p.d for p in ATTENTION_PRESETS + VARLEN_PRESETS})
    bad = [d for d in head_dims or [] if d not in dims]
    if bad:
        errors.append(f"head dim: no preset has {', '.join(map(str, bad))}; the presets' head dims: "
                      + ", ".join(map(str, dims)))
    return errors


def _launches(arch: int, *, dtype, kernels, presets, head_dims, variants, configs):
    """(case, launch, kernel name, candidate index, candidate config) of every compile, in order;
    each case's launches are captured when the iteration reaches it (its tensors are freed after)."""
    from ..kernels._launch import capture_launches

    variants, kernels = list(variants), _canonical(kernels)
    errors = selection_errors(dtype=dtype, kernels=kernels, presets=presets, head_dims=head_dims, variants=variants,
                              configs=configs)
    if errors:
        raise ValueError("; ".join(errors))
    families = {"attention", "attention_varlen", "qformer_cross_attention", "token_pool"}
    if kernels:
        families = {f for f in families if any(f.startswith(k.split(".")[0]) or k.startswith(f)
                                               or f in _KERNEL_FAMILIES.get(k.split(".")[0], ()) for k in kernels)}
    names = _kernel_names()
    for case in _cases(_DTYPES[dtype], set(presets or []), set(head_dims or []), variants, families):
        with capture_launches(arch) as launches:
            case.run()
        for launch in launches:
            name = names.get(launch.fn, f"{launch.fn.module}.{launch.fn.__name__}")
            if kernels and not any(name == k or name.startswith(k + ".") or name.startswith(k) for k in kernels):
                continue
            cands = list(enumerate(launch.candidates))
            if configs == "default":
                cands = cands[:1]
            elif configs == "tma":
                cands = [(i, c) for i, c in cands if c is not None and c.kwargs.get("USE_TMA")]
            for i, cfg in cands:
                yield case, launch, name, i, cfg


def _row(case, launch, name: str, i: int, cfg, dtype: str, arch: int) -> dict:
    flops, nbytes = case.model.get(name, (None, None))
    return dict(kernel=name, family=case.family, preset=case.preset, variant=case.variant, dtype=dtype,
                head_dim=case.head_dim, arch=arch, config=_config_dict(cfg, launch.kwargs), default=i == 0,
                flops=flops, bytes=nbytes, compiled=None, error=None)


def _specialization(fn, signature: dict, attrs: dict) -> dict:
    """Which runtime arguments the binder specialised: constant (== 1) or 16-divisible."""
    names = list(signature)
    div = [names[p[0]] for p, a in attrs.items() if any(x[0] == "tt.divisibility" for x in a)]
    const = [n for i, (n, t) in enumerate(signature.items()) if t == "constexpr" and i not in fn.constexprs]
    return {"divisible_by_16": div, "constant": const}


# ------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------
def _fmt_config(cfg: dict) -> str:
    tiles = " ".join(f"{k[len('BLOCK_'):]}{v}" for k, v in cfg.items() if k.startswith("BLOCK_"))
    return f"{tiles} w{cfg.get('num_warps')} s{cfg.get('num_stages')}" + (" TMA" if cfg.get("USE_TMA") else "")


def _fmt_num(x) -> str:
    if x is None:
        return "-"
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


SUMMARY_COLUMNS = ("kernel", "preset", "variant", "d", "config", "regs", "spill", "smem KB", "wgmma", "mma",
                   "cp.async(16B)", "tma", "ld vec", "ld scalar(<4B)", "loop SASS(FSEL)", "FLOP", "bytes")


def summary_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.get("error"):
            out.append([r["kernel"], r["preset"], r["variant"], str(r["head_dim"]), _fmt_config(r["config"]),
                        "FAILED: " + r["error"].splitlines()[0][:80]] + [""] * (len(SUMMARY_COLUMNS) - 6))
            continue
        out.append([
            r["kernel"], r["preset"], r["variant"], str(r["head_dim"]),
            _fmt_config(r["config"]) + ("" if r["default"] else " (cand)"),
            str(r["registers"]), str(r["spill_bytes"]), f"{r['shared_bytes'] / 1024:.0f}",
            str(r["wgmma"]), str(r["mma_sync"]), f"{r['cp_async']}({r['cp_async_16']})", str(r["tma"]),
            str(r["ld_vector"]), f"{r['ld_scalar']}({r['ld_scalar_narrow']})",
            " ".join(f"{lp['instructions']}({lp['fsel']})" for lp in r.get("loops", [])) or "-",
            _fmt_num(r["flops"]), _fmt_num(r["bytes"]),
        ])
    return out


def format_summary(rows: list[dict], *, markdown: bool = False) -> str:
    """The report as a table (plain text, or markdown with ``markdown=True``)."""
    body = summary_rows(rows)
    if markdown:
        lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(SUMMARY_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(SUMMARY_COLUMNS, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def problems(rows: list[dict], *, arch: int) -> list[str]:
    """What a GPU would run badly: failed compiles, spills, shared memory over the limit, and
    main loops (attention fwd/dK-dV/dQ, Q-Former) without pipelined vector loads."""
    out = []
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[80])
    for r in rows:
        what = f"{r['kernel']} {r['preset']} {r['variant']} d={r['head_dim']} {_fmt_config(r['config'])}"
        if r.get("error"):
            out.append(f"{what}: compile failed: {r['error'].splitlines()[0][:200]}")
            continue
        if r["spill_bytes"]:
            out.append(f"{what}: {r['spill_bytes']} bytes of spills ({r['registers']} registers)")
        if r["shared_bytes"] > limit:
            out.append(f"{what}: {r['shared_bytes']} bytes of shared memory > {limit}")
        if r["kernel"] in MAIN_LOOPS:
            if r["cp_async_16"] == 0 and r["tma"] == 0:
                out.append(f"{what}: main loop not pipelined (no 16-byte cp.async, no TMA)")
            # a bool mask is read a byte per score (its rows have Lk bytes: rarely 16-byte aligned)
            if r["ld_scalar_narrow"] and not VARIANTS.get(r["variant"], (False,))[0]:
                out.append(f"{what}: {r['ld_scalar_narrow']} scalar sub-4-byte global loads")
    return out


#: kernels with a pipelined main loop over tiles (the others are single-pass, memory-bound)
MAIN_LOOPS = ("attention.fwd", "attention.dkdv", "attention.dq", "attention_varlen.fwd", "attention_varlen.dkdv",
              "attention_varlen.dq", "qformer_cross_attention.fwd")


def _jsonable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "compiled"} for r in rows]


#: ``--quick``: the default configuration of one attention preset per head dim, the Qwen-VL
#: packings, the Q-Former and the pooling presets (~55 compiles; the full default run ~220)
QUICK_PRESETS = ("clip-l336", "siglip-so400m", "qwen2-vl", "eva-vit-g", "d128-16k", "qwen2-vl-packed",
                 "qwen2.5-vl-windows", "blip2", *(p.name for p in TOKEN_POOL_PRESETS))

#: seconds one compile of a default configuration takes on this project's shared 2-core CPU machine
#: (triton 3.9, sm_90, bf16, nothing in triton's cache; measured with ``mmkernels inspect --quick``:
#: 52 compiles in 85 s): the up-front estimate. The other autotuner candidates (larger tiles, more
#: stages) take ``CANDIDATE_FACTOR`` times as long (the full default run: 216 compiles in 631 s)
COMPILE_S = {"attention.fwd": 3.6, "attention.dkdv": 2.1, "attention.dq": 2.0, "attention_varlen.fwd": 2.3,
             "attention_varlen.dkdv": 1.5, "attention_varlen.dq": 2.2, "qformer_cross_attention.fwd": 2.0,
             "attention_scores.stats": 1.2, "attention_scores.colsum": 1.2}
COMPILE_S_OTHER = 0.9  # the other single-pass kernels: preprocess, RoPE gradient, token pooling
CANDIDATE_FACTOR = 1.4


def estimate_s(rows: list[dict]) -> float:
    """Rough wall seconds of compiling ``rows`` (from :func:`plan`) with nothing cached."""
    return sum(COMPILE_S.get(r["kernel"], COMPILE_S_OTHER) * (1.0 if r["default"] else CANDIDATE_FACTOR)
               for r in rows)


def _fmt_duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


class _Progress:
    """``[done/total] kernel preset ... ETA`` on stderr: a rich progress bar on a terminal (rows
    printed to a terminal stdout appear above it), else a line at most every ``every_s`` seconds."""

    def __init__(self, total: int, estimate: float, *, enabled: bool = True, every_s: float = 10.0):
        self.total, self.estimate, self.every_s = total, estimate, every_s
        self.done, self.t0, self.last = 0, time.monotonic(), time.monotonic()
        self.enabled, self.bar = enabled and total > 0, None
        if self.enabled and sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
            except ImportError:
                pass
            else:
                self.bar = Progress(TextColumn("inspect"), BarColumn(bar_width=20), MofNCompleteColumn(),
                                    TimeElapsedColumn(),
                                    TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                                    console=Console(file=sys.stderr), transient=True,
                                    redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)
                self.task = self.bar.add_task("", total=total)
                self.bar.start()

    def __call__(self, row: dict) -> None:
        self.done += 1
        if not self.enabled:
            return
        what = f"{row['kernel']} {row['preset']} {row['variant']} {_fmt_config(row['config'])}"
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{row['kernel']} {row['preset']}")
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            elapsed = now - self.t0
            left = elapsed / self.done * (self.total - self.done)
            print(f"[{self.done}/{self.total}] {_fmt_duration(elapsed)} elapsed, ~{_fmt_duration(left)} left: "
                  f"compiled {what} ({row['compile_s']} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    """``mmkernels inspect``: exit status 1 when a compile fails (or, with ``--check``, on any
    of :func:`problems`), 2 on bad arguments (an unknown kernel, preset, head dim, variant or
    dtype, or a selection with nothing to compile)."""
    import warnings

    from ..bench.cases import DTYPE_SPELLINGS, dtype_arg

    ap = argparse.ArgumentParser(
        prog="mmkernels inspect",
        description="Compile every kernel launch at the preset shapes for a CUDA target (no GPU needed) with a "
        "real launch's specialisation, and report registers, spills, shared memory, tensor-core "
        "instructions, async copies and load widths. Rows are printed as their compiles finish; the "
        "number of compiles and a time estimate come first. Without arguments: every autotuner candidate of "
        "the default presets, about 220 compiles, ~10 min on a 2-core CPU (--quick: about 55, ~1.5 min; "
        "a compile already in triton's cache takes about a second).",
    )
    ap.add_argument("--arch", type=int, default=90, choices=(80, 86, 89, 90), help="compute capability (default 90)")
    ap.add_argument("--dtype", default="bfloat16", metavar="DTYPE",
                    type=lambda t: "fp8" if t.strip().lower() in ("fp8", "e4m3", "float8_e4m3fn") else dtype_arg(t),
                    help=f"{DTYPE_SPELLINGS}, fp8/e4m3 (the fp8 forward of fp8='dynamic') (default bf16)")
    ap.add_argument("--kernel", action="append", default=[],
                    help="kernel name or prefix (attention, attention.fwd, attention_varlen, qformer_cross_attention "
                    "(alias: qformer), token_pool); repeatable")
    ap.add_argument("--preset", action="append", default=[], help="preset name; repeatable")
    ap.add_argument("--head-dim", type=int, action="append", default=[], help="attention head dim; repeatable")
    ap.add_argument("--variant", action="append", default=[],
                    help=f"attention variant, one of {list(VARIANTS)} or 'all'; repeatable (default plain)")
    ap.add_argument("--quick", action="store_true",
                    help="the default configuration only, of the main presets unless --preset/--head-dim name others "
                    f"({', '.join(QUICK_PRESETS)}): about 55 compiles, ~1.5 min on a 2-core CPU")
    ap.add_argument("--default-only", action="store_true", help="only the first (untuned default) configuration")
    ap.add_argument("--tma-only", action="store_true",
                    help="only the tensor-descriptor (TMA) candidates of the attention main loops")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON (at the end)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    ap.add_argument("--check", action="store_true", help="exit 1 on spills, shared memory over the limit or "
                    "main loops without pipelined vector loads")
    args = ap.parse_args(argv)
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "fp8": "fp8"}[args.dtype]
    variants = list(VARIANTS) if "all" in args.variant else (args.variant or ["plain"])
    presets = args.preset or (list(QUICK_PRESETS) if args.quick and not args.head_dim else [])
    if args.tma_only and (args.default_only or args.quick):
        ap.error("--tma-only selects candidates that are never the default: not with --default-only / --quick")
    configs = "tma" if args.tma_only else "default" if args.default_only or args.quick else "all"
    selection = dict(dtype=dtype, kernels=args.kernel, presets=presets, head_dims=args.head_dim, variants=variants,
                     configs=configs)
    from .._utils import interpreting

    if interpreting():
        print("mmkernels inspect: TRITON_INTERPRET is set, so the kernels would be interpreted Python, not "
              "compiled: run it without TRITON_INTERPRET", file=sys.stderr)
        return 2
    errors = selection_errors(**selection)
    if errors:
        ap.error("\n  ".join(errors))
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION is unset")  # triton 3.9's notice, not ours
    import triton

    planned = plan(args.arch, **selection)
    if not planned:
        ap.error("nothing to compile: no launch matches this selection (--kernel, --preset, --head-dim, --variant, "
                 "--tma-only together); the kernels of a family run only at its presets")
    eta = estimate_s(planned)
    head = (f"sm_{args.arch}, {dtype}, triton {triton.__version__}: {len(planned)} compiles "
            f"({len({r['kernel'] for r in planned})} kernels, {len({(r['preset'], r['variant']) for r in planned})} "
            f"preset/variant calls, {'every autotuner candidate' if configs == 'all' else configs + ' configs'}); "
            f"about {_fmt_duration(eta)} on a 2-core CPU with nothing in triton's cache")
    print(head, file=sys.stderr if args.json else sys.stdout, flush=True)

    # the table is printed as the compiles finish: its text columns are sized from the plan
    ident = [[r["kernel"], r["preset"], r["variant"], str(r["head_dim"]),
              _fmt_config(r["config"]) + ("" if r["default"] else " (cand)")] for r in planned]
    widths = [max(len(c), *(len(x[i]) for x in ident)) if i < 5 else max(len(c), 5)
              for i, c in enumerate(SUMMARY_COLUMNS)]

    def table_line(cells: list[str]) -> str:
        if args.markdown:
            return "| " + " | ".join(cells) + " |"
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    if not args.json:
        print(table_line(list(SUMMARY_COLUMNS)))
        if args.markdown:
            print("|" + "---|" * len(SUMMARY_COLUMNS))
    progress = _Progress(len(planned), eta, enabled=not args.quiet)

    def on_row(row: dict) -> None:
        progress(row)
        if not args.json:
            print(table_line(summary_rows([row])[0]), flush=True)

    try:
        rows = compile_report(args.arch, progress=on_row, **selection)
    finally:
        progress.close()
    found = problems(rows, arch=args.arch)
    if args.json:
        json.dump({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__, "rows": _jsonable(rows),
                   "problems": found}, sys.stdout, indent=1, default=str)
        print()
    else:
        took = time.monotonic() - progress.t0
        print(f"\n{len(rows)} compiles in {_fmt_duration(took)}; {len(found)} problem(s)" + (":" if found else ""))
        for p in found:
            print("  " + p)
    failed = any(r["error"] for r in rows)
    return 1 if failed or (args.check and found) else 0


class _CallableModule(types.ModuleType):
    """``mmkernels.tools.compile_report(arch=90)`` calls :func:`compile_report` whatever the
    import order: importing this submodule rebinds the package attribute of that name to the
    module, so the module itself forwards calls to the function."""

    def __call__(self, *args, **kwargs):
        return compile_report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    sys.exit(main())
