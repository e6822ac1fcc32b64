"""Seeded random-shape fuzz tests of every op's Triton path against float64.

Each case is drawn from a seed (its id prints the whole case, so a failure replays with
``-k "<id>"``): shapes, dtypes, masks, causal, GQA, head dims (any, not only multiples of 8),
memory layouts (contiguous, HF's transposed (B, L, H, D) view, strided slices), and for the
Q-Former broadcast batches and padding masks; token_pool draws modes, grids, CLS and fused norms.
Forward and every gradient must satisfy the 2x-PyTorch rule against float64, with outputs
NaN-poisoned before launch.

The default run draws ``DEFAULT`` cases per op (300+ in all, well inside the CI budget at these
small sizes); ``pytest -m fuzz`` draws ``FULL`` per op (2,000+ in all).  Also: each kernel runs
once with its first GPU launch configuration (the block sizes a GPU uses, not the interpreter's)
on a few odd shapes, so tile logic that only larger blocks exercise is covered on CPU too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_rule, poisoned
from token_pool_helpers import norm_params
from token_pool_helpers import reference as pool_reference

import mmkernels as mk
from mmkernels.reference.attention import attention as ref_attention
from mmkernels.reference.qformer_cross_attention import qformer_cross_attention as ref_qformer

pytestmark = [pytest.mark.fuzz, pytest.mark.filterwarnings("ignore::UserWarning")]

DEFAULT = {"attention": 130, "qformer": 90, "token_pool": 100}
FULL = {"attention": 900, "qformer": 600, "token_pool": 600}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _counts(config, op):
    expr = config.getoption("-m") or ""
    return FULL[op] if "fuzz" in expr and "not fuzz" not in expr else DEFAULT[op]


def pytest_generate_tests(metafunc):  # noqa: D401 - pytest hook (module-level)
    for op, maker in (("attention", AttnCase.draw), ("qformer", QfCase.draw), ("token_pool", PoolCase.draw)):
        name = f"{op}_case"
        if name in metafunc.fixturenames:
            cases = [maker(seed) for seed in range(_counts(metafunc.config, op))]
            metafunc.parametrize(name, cases, ids=str)


def _leaf(shape, dtype, layout, rng_scale=1.0):
    """A (.., L, E)-shaped leaf viewed through ``layout`` (the tensor handed to the op)."""
    if layout == "transposed" and len(shape) == 4:  # HF: (B, L, H, D) storage viewed as (B, H, L, D)
        b, h, length, d = shape
        base = torch.randn(b, length, h, d, device=DEVICE) * rng_scale
        return base.to(dtype).requires_grad_(), lambda t: t.transpose(1, 2)
    if layout == "strided":  # a window of a wider, longer buffer
        base = torch.randn(*shape[:-2], shape[-2] + 3, shape[-1] + 5, device=DEVICE) * rng_scale
        return base.to(dtype).requires_grad_(), lambda t: t[..., 2:2 + shape[-2], 1:1 + shape[-1]]
    base = torch.randn(*shape, device=DEVICE) * rng_scale
    return base.to(dtype).requires_grad_(), lambda t: t


def _check_grads(name, leaves, out, ref_fn, dtype, factor=2.0):
    """Compare ``out`` and d(out)/d(leaves) with ``ref_fn(leaves cast)`` in float64 (2x rule)."""
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do, allow_unused=True)

    def run(cast):
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        o = ref_fn(ls, cast)
        return o, torch.autograd.grad(o, ls, do.to(cast), allow_unused=True)

    out64, g64 = run(torch.float64)
    outlp, glp = run(dtype)
    assert_close_rule(f"{name} out", out, out64, outlp, factor)
    scale = max(float(r.abs().max()) for r in g64 if r is not None and r.numel())
    for i, (g, r, rl) in enumerate(zip(grads, g64, glp)):
        if r is None:
            continue
        assert g is not None, f"{name}: grad {i} missing"
        if r.numel() and float(r.abs().max()) == 0.0:
            # exactly 0 in exact arithmetic (e.g. a single key: softmax is constant): the kernel's
            # rounding residue is judged against the size of the other gradients
            tol = (1e-5 if dtype == torch.float32 else 2e-2) * scale
            assert float(g.abs().max()) <= tol, f"{name} grad {i}: {float(g.abs().max()):.3g} where 0 is exact"
            continue
        assert_close_rule(f"{name} grad {i}", g, r, rl, factor * 1.5)


# ------------------------------------------------------------------------------ attention
@dataclass(frozen=True)
class AttnCase:
    seed: int
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    dv: int
    dtype: str
    mask: str
    causal: bool
    layout: str

    @staticmethod
    def draw(seed):
        r = random.Random(1000 + seed)
        hkv = r.choice([1, 1, 2])
        hq = hkv * r.choice([1, 1, 2, 3])
        d = r.choice([8, 16, 24, 32, 64, 72, 80, 88, r.randint(1, 96)])
        dv = d if r.random() < 0.85 else r.choice([8, 24, 40])
        lq = r.choice([1, 2, r.randint(3, 40), r.randint(40, 80)])
        lk = lq if r.random() < 0.4 else r.choice([1, r.randint(2, 40), r.randint(40, 90)])
        return AttnCase(seed, r.choice([1, 2]), hq, hkv, lq, lk, d, dv, r.choice(list(DTYPES)),
                        r.choice(["none", "none", "bool_pad", "bool_full", "float_row", "float_full"]),
                        r.random() < 0.3, r.choice(["contiguous", "transposed", "strided"]))

    def __str__(self):
        return (f"s{self.seed}-B{self.b}-H{self.hq}/{self.hkv}-{self.lq}x{self.lk}-d{self.d}"
                + (f"-dv{self.dv}" if self.dv != self.d else "")
                + f"-{self.dtype}-{self.mask}{'-causal' if self.causal else ''}-{self.layout}")


def _attn_mask(case, dtype):
    g = torch.Generator(device="cpu").manual_seed(case.seed)
    lq, lk = case.lq, case.lk
    if case.mask == "bool_pad":  # HF padding (B, 1, 1, Lk), key 0 always kept
        m = torch.rand(case.b, 1, 1, lk, generator=g) > 0.3
        m[..., 0] = True
        return m.to(DEVICE)
    if case.mask == "bool_full":  # some rows may end up fully masked: they must give 0
        return (torch.rand(case.b, case.hq, lq, lk, generator=g) > 0.4).to(DEVICE)
    if case.mask == "float_row":
        return torch.randn(1, 1, lq, lk, generator=g).to(DEVICE, dtype)
    if case.mask == "float_full":
        return torch.randn(case.b, case.hq, lq, lk, generator=g).to(DEVICE, dtype)
    return None


def test_fuzz_attention(attention_case):
    c = attention_case
    torch.manual_seed(c.seed)
    dtype = DTYPES[c.dtype]
    (q0, vq), (k0, vk), (v0, vv) = (_leaf((c.b, c.hq, c.lq, c.d), dtype, c.layout),
                                    _leaf((c.b, c.hkv, c.lk, c.d), dtype, c.layout),
                                    _leaf((c.b, c.hkv, c.lk, c.dv), dtype, c.layout))
    mask = _attn_mask(c, dtype)
    kw = dict(attn_mask=mask, is_causal=c.causal, enable_gqa=c.hq != c.hkv)
    with poisoned():
        out = mk.attention(vq(q0), vk(k0), vv(v0), backend="triton", **kw)

    def ref(ls, cast):
        m = mask.to(cast) if mask is not None and mask.dtype != torch.bool else mask
        return ref_attention(vq(ls[0]), vk(ls[1]), vv(ls[2]), **dict(kw, attn_mask=m))

    _check_grads(str(c), [q0, k0, v0], out, ref, dtype)


# ------------------------------------------------------------------------------- Q-Former
@dataclass(frozen=True)
class QfCase:
    seed: int
    b: int
    bkv: int
    lq: int
    lk: int
    heads: int
    d: int
    dkv: int
    dtype: str
    mask: str

    @staticmethod
    def draw(seed):
        r = random.Random(5000 + seed)
        b = r.choice([1, 2, 3])
        bkv = r.choice([b, b, 1]) if b > 1 else r.choice([1, 2])
        return QfCase(seed, b, bkv, r.choice([1, 8, r.randint(2, 40)]), r.choice([1, r.randint(2, 70)]),
                      r.choice([1, 2, 3]), r.choice([8, 16, 24, 32, r.randint(2, 40)]), r.randint(4, 56),
                      r.choice(["fp32", "fp32", "fp16", "bf16"]), r.choice(["none", "keep", "additive"]))

    def __str__(self):
        return (f"s{self.seed}-B{self.b}/{self.bkv}-{self.lq}x{self.lk}-H{self.heads}xd{self.d}-Dkv{self.dkv}"
                f"-{self.dtype}-{self.mask}")


def test_fuzz_qformer(qformer_case):
    c = qformer_case
    torch.manual_seed(c.seed)
    dtype = DTYPES[c.dtype]
    a = c.heads * c.d
    b = max(c.b, c.bkv)

    def p(*shape, s=1.0):
        return (torch.randn(*shape, device=DEVICE) * s).to(dtype).requires_grad_()

    leaves = [p(c.b, c.lq, a), p(c.bkv, c.lk, c.dkv), p(a, a, s=a**-0.5), p(a, s=0.1),
              p(a, c.dkv, s=c.dkv**-0.5), p(a, s=0.1), p(a, c.dkv, s=c.dkv**-0.5), p(a, s=0.1)]
    mask = None
    if c.mask == "keep":
        mask = torch.rand(b, c.lk, device=DEVICE) > 0.3
        mask[:, 0] = True
    elif c.mask == "additive":
        mask = torch.randn(b, 1, 1, c.lk, device=DEVICE).to(dtype)
    with poisoned():
        out = mk.qformer_cross_attention(*leaves, c.heads, encoder_attention_mask=mask, backend="triton")

    def ref(ls, cast):
        m = mask.to(cast) if mask is not None and mask.dtype != torch.bool else mask
        return ref_qformer(*ls, c.heads, encoder_attention_mask=m)

    # the key-bias gradient is exactly 0 in exact arithmetic (softmax is shift invariant): leave it out
    do_leaves = leaves[:5] + leaves[6:]
    _check_grads(str(c), do_leaves, out,
                 lambda ls, cast: ref(ls[:5] + [leaves[5].detach().to(cast)] + ls[5:], cast), dtype)


# ----------------------------------------------------------------------------- token_pool
@dataclass(frozen=True)
class PoolCase:
    seed: int
    b: int
    h: int
    w: int
    c: int
    mode: str
    kw: tuple
    norm: str
    dtype: str
    layout: str

    @staticmethod
    def draw(seed):
        r = random.Random(9000 + seed)
        mode = r.choice(["avg", "max", "bilinear", "merge"])
        k = r.choice([1, 2, 3])
        if mode == "merge":
            k = r.choice([1, 2])
            h, w = k * r.randint(1, 6), k * r.randint(1, 6)
            kw = (("kernel_size", k),)
        elif mode == "bilinear":
            h, w = r.randint(1, 12), r.randint(1, 12)
            kw = (("output_size", (r.randint(1, 9), r.randint(1, 9))),)
        else:
            h, w = r.randint(k, 12), r.randint(k, 12)
            kw = (("kernel_size", k), ("stride", r.choice([k, max(1, k - 1)])))
        cls = r.random() < 0.3
        if cls:
            kw += (("has_cls", True),) + ((("keep_cls", True),) if mode != "merge" and r.random() < 0.5 else ())
        return PoolCase(seed, r.choice([1, 2]), h, w, r.choice([1, 8, 24, r.randint(2, 70)]), mode, kw,
                        r.choice(["none", "none", "layernorm", "rmsnorm"]), r.choice(["fp32", "fp32", "fp16", "bf16"]),
                        r.choice(["contiguous", "slice", "transposed"]))

    def __str__(self):
        extra = "-".join(f"{k}={v}" for k, v in self.kw).replace(" ", "")
        return (f"s{self.seed}-B{self.b}-{self.h}x{self.w}x{self.c}-{self.mode}-{extra}-{self.norm}"
                f"-{self.dtype}-{self.layout}")


def test_fuzz_token_pool(token_pool_case):
    from token_pool_helpers import tokens

    c = token_pool_case
    torch.manual_seed(c.seed)
    dtype = DTYPES[c.dtype]
    kw = dict(c.kw)
    n = c.h * c.w + int(kw.get("has_cls", False))
    x = tokens(c.b, n, c.c, dtype=dtype, layout=c.layout)
    width = c.c * kw.get("kernel_size", 1) ** 2 if c.mode == "merge" else c.c
    w_, b_ = norm_params(width, dtype) if c.norm != "none" else (None, None)
    kw = dict(kw, grid=(c.h, c.w), mode=c.mode, norm=None if c.norm == "none" else c.norm)
    with poisoned():
        out = mk.token_pool(x, norm_weight=w_, norm_bias=b_, backend="triton", **kw)
    do = torch.randn_like(out)
    leaves = [t for t in (x, w_, b_) if t is not None]
    grads = torch.autograd.grad(out, leaves, do)
    out64, g64 = pool_reference(x, w_, b_, do, torch.float64, kw)
    outlp, glp = pool_reference(x, w_, b_, do, dtype, kw)
    assert_close_rule(f"{c} out", out, out64, outlp)
    for i, (g, r, rl) in enumerate(zip(grads, g64, glp)):
        assert_close_rule(f"{c} grad {i}", g, r, rl, 3.0)


# ------------------------------------------------- the GPU's block sizes, in the interpreter
@pytest.mark.parametrize("shape", [(1, 2, 2, 131, 77, 72, False), (2, 2, 1, 200, 200, 88, True),
                                   (1, 1, 1, 1, 129, 40, False)], ids=lambda s: "B{}-H{}/{}-{}x{}-d{}-c{}".format(*s))
def test_attention_with_first_gpu_config(monkeypatch, shape):
    """The kernels with the block sizes of their first GPU candidate (e.g. 128×64) instead of the
    interpreter's small tiles: a tile bug that only large blocks reach fails here, on CPU."""
    from mmkernels.kernels import attention as kattn

    b, hq, hkv, lq, lk, d, causal = shape
    for kind in ("fwd", "dkdv", "dq"):
        cfg = kattn._gpu_configs(kind, d, torch.float16)[0]
        monkeypatch.setitem(kattn._INTERP, kind, dict(cfg.kwargs))
    q = torch.randn(b, hq, lq, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
    v = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
    kw = dict(is_causal=causal, enable_gqa=hq != hkv)
    with poisoned():
        out = mk.attention(q, k, v, backend="triton", **kw)
    _check_grads(f"gpu-config {shape}", [q, k, v], out, lambda ls, cast: ref_attention(*ls, **kw), torch.float16)
