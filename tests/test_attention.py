"""mmkernels.attention on the Triton path (interpreter on CPU, real kernels on CUDA).

Every case: fresh random inputs, outputs poisoned with NaN before launch, forward and all
gradients compared with a float64 reference; low precision by the 2x-PyTorch rule.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, assert_close_rule, poisoned

import mmkernels as mk
from mmkernels import dispatch
from mmkernels.reference.attention import attention as ref_attention
from mmkernels.reference.attention import attention_probs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inputs(b, hq, hkv, lq, lk, d, dtype, transposed=False):
    def make(h, length):
        if transposed:  # HF layout: (B, L, H, D) viewed as (B, H, L, D)
            return torch.randn(b, length, h, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, length, d, device=DEVICE, dtype=dtype, requires_grad=True)

    return make(hq, lq), make(hkv, lk), make(hkv, lk)


def _reference(q, k, v, do, cast, **kw):
    """Output and (dq, dk, dv) of the plain-PyTorch reference run in dtype ``cast``."""
    qc, kc, vc = (x.detach().to(cast).requires_grad_() for x in (q, k, v))
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(cast)
    out = ref_attention(qc, kc, vc, attn_mask=mask, **kw)
    grads = torch.autograd.grad(out, (qc, kc, vc), do.to(cast))
    return out, grads


def check(q, k, v, *, grad=True, factor=2.0, **kw):
    """Run the Triton path (forced) and compare output and gradients with float64."""
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention(q, k, v, **kw)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do) if grad else ()
    ref_kw = {key: val for key, val in kw.items() if key != "dropout_p"}
    out64, grads64 = _reference(q, k, v, do, torch.float64, **ref_kw)
    outlp, gradslp = _reference(q, k, v, do, q.dtype, **ref_kw)
    assert_close_rule("out", out, out64, outlp, factor)
    for name, g, g64, glp in zip(("dq", "dk", "dv"), grads, grads64, gradslp):
        assert g.shape == g64.shape and g.dtype == q.dtype
        assert_close_rule(name, g, g64, glp, factor)
    return out, grads


# (B, Hq, Hkv, Lq, Lk, D, causal): head dims {16, 64, 72, 88, 128}, odd lengths, Lq != Lk
SHAPES = [
    (2, 2, 2, 113, 113, 64, False),
    (1, 2, 2, 113, 113, 64, True),
    (1, 2, 2, 17, 257, 88, False),   # Q-Former-like Lq << Lk
    (1, 2, 2, 257, 17, 72, True),    # causal with Lq > Lk
    (1, 1, 1, 17, 113, 72, True),    # causal with Lq < Lk (top-left)
    (2, 1, 1, 1, 257, 128, False),   # decode 1 x N
    (1, 3, 3, 1, 1, 16, False),
    (1, 1, 1, 33, 47, 80, False),
    (1, 1, 1, 40, 40, 256, True),
    (1, 2, 2, 24, 24, 8, False),
]


def _id(case):
    b, hq, hkv, lq, lk, d, causal = case
    return f"B{b}-H{hq}-{lq}x{lk}-d{d}" + ("-causal" if causal else "")


@pytest.mark.parametrize("case", SHAPES, ids=[_id(c) for c in SHAPES])
def test_fp32_shapes(case):
    b, hq, hkv, lq, lk, d, causal = case
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, torch.float32)
    check(q, k, v, is_causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d,causal", [(64, True), (88, False), (72, False)], ids=["d64-causal", "d88", "d72"])
def test_low_precision(dtype, d, causal):
    q, k, v = _inputs(2, 2, 2, 113, 113, d, dtype)
    check(q, k, v, is_causal=causal)


def test_low_precision_masked_gqa():
    q, k, v = _inputs(2, 4, 2, 57, 113, 88, torch.bfloat16)
    mask = torch.rand(2, 1, 1, 113, device=DEVICE) > 0.3
    check(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize(
    "mask_shape",
    [(2, 1, 1, 113), (2, 1, 57, 113), (57, 113), (2, 3, 57, 113), (3, 1, 113), (1, 1, 1, 1)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks(mask_shape, kind):
    q, k, v = _inputs(2, 3, 3, 57, 113, 64, torch.float32)
    if kind == "bool":
        mask = torch.rand(mask_shape, device=DEVICE) > 0.4
    else:
        mask = torch.randn(mask_shape, device=DEVICE) * 2
        mask[torch.rand(mask_shape, device=DEVICE) < 0.3] = float("-inf")
    check(q, k, v, attn_mask=mask)


def test_mask_and_causal_combined():
    q, k, v = _inputs(1, 2, 2, 70, 90, 64, torch.float32)
    mask = torch.rand(1, 1, 70, 90, device=DEVICE) > 0.2
    check(q, k, v, attn_mask=mask, is_causal=True)


def test_hf_min_value_padding_mask():
    """HF's additive masks use finfo(dtype).min, including rows that are entirely padding."""
    q, k, v = _inputs(2, 2, 2, 33, 33, 64, torch.float32)
    mask = torch.zeros(2, 1, 33, 33, device=DEVICE)
    mask[0, :, :, :5] = torch.finfo(torch.float32).min  # left padding of sample 0
    mask[0, :, :5, :] = torch.finfo(torch.float32).min  # padded query rows see nothing
    check(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_nonpositive_scale(scale):
    """The kernels fold the scale into the exp2's FMA (max(s)·scale = max(s·scale) needs
    scale > 0); scales <= 0 — valid for SDPA — take the pre-scaled path: same results."""
    q, k, v = _inputs(1, 2, 2, 45, 77, 72, torch.float32)
    check(q, k, v, scale=scale, is_causal=True)
    check(q, k, v, scale=scale)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_very_negative_logits_ragged_keys(causal):
    """Every logit of every row below -128 in base 2 (exp2 of its negation overflows fp32) with
    a ragged last key block: the interior tiles carry no bounds mask, so a zero padding key
    would get P = exp2(-m) = inf (NaN gradients) if the edge tile did not mask it."""
    q, k, v = _inputs(1, 2, 2, 70, 45, 64, torch.float32)
    with torch.no_grad():
        q.copy_(1.0 + 0.1 * q.abs())
        k.copy_(-(1.0 + 0.1 * k.abs()))
    assert float((q[0, 0] @ k[0, 0].T).max()) * 1.5 * math.log2(math.e) < -128
    out, grads = check(q, k, v, is_causal=causal, scale=1.5)
    assert all(torch.isfinite(t).all() for t in (out, *grads))


@pytest.mark.parametrize("lq,lk", [(200, 130), (130, 200), (97, 97)])
def test_causal_band_split(lq, lk):
    """Causal with several query and key blocks (interpreter tiles 64×32 forward, 32×64 dK/dV):
    the off-band blocks run without mask work, the diagonal band with it, for Lq < Lk, Lq > Lk."""
    q, k, v = _inputs(1, 1, 1, lq, lk, 88, torch.float32)
    check(q, k, v, is_causal=True)


@pytest.mark.parametrize("kind", ["bool", "additive", "causal"])
def test_fully_masked_rows_are_zero(kind):
    q, k, v = _inputs(1, 2, 2, 40, 50, 64, torch.float32)
    kw = {}
    if kind == "bool":
        mask = torch.rand(1, 2, 40, 50, device=DEVICE) > 0.5
        mask[0, 1, 7] = False
        mask[0, 0, 0] = False
        kw["attn_mask"] = mask
        dead = [(0, 1, 7), (0, 0, 0)]
    elif kind == "additive":
        mask = torch.randn(1, 1, 40, 50, device=DEVICE)
        mask[0, 0, 39] = float("-inf")
        kw["attn_mask"] = mask
        dead = [(0, 0, 39), (0, 1, 39)]
    else:
        # a bool padding mask that hides key 0 plus causal: row 0 sees nothing
        kw["attn_mask"] = (torch.arange(50, device=DEVICE) > 0).view(1, 1, 1, 50)
        kw["is_causal"] = True
        dead = [(0, 0, 0), (0, 1, 0)]
    out, (dq, dk, dv) = check(q, k, v, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    for idx in dead:
        assert (out[idx] == 0).all(), f"row {idx} should be 0"
        assert (dq[idx] == 0).all(), f"dq row {idx} should be 0"


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1)], ids=["gqa4-2", "mqa6-1"])
def test_gqa(hq, hkv):
    q, k, v = _inputs(2, hq, hkv, 45, 77, 72, torch.float32)
    check(q, k, v, enable_gqa=True, is_causal=True)


def test_scale_and_non_contiguous_inputs():
    q, k, v = _inputs(2, 3, 3, 50, 61, 80, torch.float32, transposed=True)
    assert not q.is_contiguous()
    check(q, k, v, scale=0.37)


def test_fp32_precision_setting(monkeypatch):
    from mmkernels.kernels._tiles import _dot_precision

    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert _dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(old)


def test_head_dim_split_saves_work():
    from mmkernels.kernels._tiles import split_head_dim

    assert split_head_dim(64) == (64, 0)
    assert split_head_dim(72) == (64, 16)
    assert split_head_dim(80) == (64, 16)
    assert split_head_dim(88) == (64, 32)
    for d in range(8, 257, 8):
        d0, d1 = split_head_dim(d)
        assert d0 + d1 >= d and d0 >= 16 and (d1 == 0 or d1 >= 16)
        assert d0 & (d0 - 1) == 0 and d1 & (d1 - 1) == 0
        assert d0 + d1 <= max(16, 1 << (d - 1).bit_length())


# ----------------------------------------------------------------------------- dropout
def _dropout_probe(p, seed, b=2, h=2, lq=37, lk=48, d=64):
    """With V = identity rows the output *is* dropout(P)/(1-p): the kernel's mask is readable."""
    torch.manual_seed(seed)
    q = torch.randn(b, h, lq, d, device=DEVICE)
    k = torch.randn(b, h, lk, d, device=DEVICE)
    v = torch.zeros(b, h, lk, d, device=DEVICE)
    v[..., torch.arange(lk), torch.arange(lk)] = 1.0
    torch.manual_seed(seed + 1)
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention(q, k, v, dropout_p=p)
    return q, k, v, out


def test_dropout_reproducible_and_kept_fraction():
    p = 0.3
    q, k, v, out1 = _dropout_probe(p, 0)
    _, _, _, out2 = _dropout_probe(p, 0)
    assert torch.equal(out1, out2), "torch.manual_seed must replay the dropout mask"
    torch.manual_seed(99)
    with mk.use_backend("triton"):
        out3 = mk.attention(q, k, v, dropout_p=p)
    assert not torch.equal(out1, out3), "a different seed must give a different mask"
    probs = attention_probs(q.double(), k.double())
    kept = out1[..., :48] != 0
    frac = kept.double().mean().item()
    n = kept.numel()
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), f"kept fraction {frac:.4f}, expected {1 - p}"
    # kept entries are P / (1 - p)
    assert_close_abs("kept probs", out1[..., :48][kept], (probs / (1 - p))[kept], 1e-5)
    # heads and batches draw different masks
    assert not torch.equal(kept[0, 0], kept[0, 1]) and not torch.equal(kept[0, 0], kept[1, 0])


def test_dropout_backward_matches_forward_mask():
    p = 0.25
    q, k, v, out = _dropout_probe(p, 3)
    keep = out[..., :48] != 0
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    torch.manual_seed(4)  # same draw as _dropout_probe's second seed
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention(q, k, v, dropout_p=p)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64 = ref_attention(q64, k64, v64, dropout_p=p, dropout_mask=keep)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())
    assert_close_abs("out", out, out64, 1e-5)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_abs(name, g, g64, 2e-5)


def test_dropout_with_mask_gqa_causal():
    """Dropout composes with the other features (fwd/bwd consistency via the V=I probe)."""
    p = 0.5
    torch.manual_seed(5)
    q = torch.randn(1, 4, 30, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 40, 64, device=DEVICE)
    v = torch.zeros(1, 2, 40, 64, device=DEVICE)
    v[..., torch.arange(40), torch.arange(40)] = 1.0
    k.requires_grad_()
    v.requires_grad_()
    mask = torch.rand(1, 1, 1, 40, device=DEVICE) > 0.2
    kw = dict(attn_mask=mask, is_causal=True, enable_gqa=True, dropout_p=p)
    torch.manual_seed(6)
    with mk.use_backend("triton"):
        out = mk.attention(q, k, v, **kw)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    keep = out[..., :40] != 0
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    kw.pop("dropout_p")
    out64 = ref_attention(q64, k64, v64, dropout_p=p, dropout_mask=keep, **kw)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())
    assert_close_abs("out", out, out64, 1e-5)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_abs(name, g, g64, 2e-5)


# ---------------------------------------------------------------- registration / compile
def test_opcheck():
    q, k, v = _inputs(1, 2, 2, 17, 33, 72, torch.float32)
    mask = torch.rand(1, 1, 1, 33, device=DEVICE) > 0.2
    seed = torch.tensor([1234], device=DEVICE)
    torch.library.opcheck(torch.ops.mmkernels.attention_fwd.default, (q, k, v, mask, seed, 0.1, True, 0.2))
    torch.library.opcheck(torch.ops.mmkernels.attention_fwd.default, (q, k, v, None, None, 0.0, False, 0.2))
    with torch.no_grad():
        out, lse = torch.ops.mmkernels.attention_fwd(q, k, v, mask, None, 0.0, False, 0.2)
    do = torch.randn_like(out)
    q, k, v = (x.detach() for x in (q, k, v))  # the backward op has no double backward
    torch.library.opcheck(
        torch.ops.mmkernels.attention_bwd.default, (do, q, k, v, out, lse, mask, seed, 0.1, True, 0.2)
    )


def test_compile_fullgraph_aot_eager():
    q, k, v = _inputs(1, 2, 2, 17, 33, 64, torch.float32)
    mask = torch.rand(1, 1, 1, 33, device=DEVICE) > 0.2

    def f(q, k, v, mask):
        with mk.use_backend("triton"):
            return mk.attention(q, k, v, attn_mask=mask, is_causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, mask)
    expected = f(q, k, v, mask)
    assert_close_abs("compiled out", out, expected, 1e-6)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(expected.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        assert_close_abs("compiled grad", a, b, 1e-6)


def test_compile_fullgraph_inductor():
    q, k, v = _inputs(1, 2, 2, 17, 33, 64, torch.float32)

    def f(q, k, v):
        return mk.attention(q * 2, k, v).sin()

    compiled = torch.compile(f, fullgraph=True)
    assert_close_abs("inductor out", compiled(q, k, v), f(q, k, v), 1e-6)


# --------------------------------------------------------------------------- dispatch
def test_auto_uses_triton_under_interpreter():
    q, k, v = _inputs(1, 1, 1, 5, 7, 16, torch.float32)
    assert mk.dispatch.explain("attention", q, k, v, scale=0.25).chosen == "triton"


def test_forced_triton_raises_with_reasons():
    q, k, v = _inputs(1, 1, 1, 5, 7, 16, torch.float64)
    with mk.use_backend("triton"), pytest.raises(mk.BackendNotSupportedError, match="float64"):
        mk.attention(q, k, v)
    q, k, v = _inputs(1, 1, 1, 5, 7, 264, torch.float32)
    with pytest.raises(mk.BackendNotSupportedError, match="head dim 264"):
        mk.attention(q, k, v, backend="triton")


def test_auto_falls_back_with_one_warning():
    dispatch._warned.clear()
    q, k, v = _inputs(1, 1, 1, 5, 7, 264, torch.float32)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = mk.attention(q, k, v)
        mk.attention(q, k, v)
    msgs = [str(w.message) for w in rec if "head dim 264" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert_close_abs("fallback", out, torch.nn.functional.scaled_dot_product_attention(q, k, v), 1e-6)


def test_env_backend_forces(monkeypatch):
    monkeypatch.setenv("MMKERNELS_BACKEND", "reference")
    q, k, v = _inputs(1, 1, 1, 5, 7, 16, torch.float32)
    inputs = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.25,
                  enable_gqa=False)
    assert dispatch.select("attention", inputs).name == "reference"
    monkeypatch.setenv("MMKERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend"):
        dispatch.select("attention", inputs)


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU route without the interpreter")
def test_cpu_without_interpreter_goes_to_sdpa():
    code = (
        "import os, warnings, torch, mmkernels as mk\n"
        "warnings.simplefilter('error')\n"
        "q = torch.randn(1, 2, 9, 16)\n"
        "print(mk.dispatch.explain('attention', q, q, q, scale=1.0).chosen)\n"
        "mk.attention(q, q, q)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("TRITON_INTERPRET", "MMKERNELS_BACKEND")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "sdpa"


# ------------------------------------------------------------------------ bad inputs
def _bad(**over):
    q = torch.randn(2, 4, 8, 16)
    k = torch.randn(2, 4, 10, 16)
    v = torch.randn(2, 4, 10, 16)
    args = dict(query=q, key=k, value=v)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(query=torch.randn(16)), r"query: expected a tensor \(\.\.\., L, E\) of at least 2 dims.*shape=\(16,\)"),
        (dict(query=torch.randn(4, 8, 16)), r"key: expected 3 dims like query"),
        (dict(key=torch.randn(2, 4, 10, 16, dtype=torch.float64)), r"key: expected dtype torch.float32"),
        (dict(query=torch.randint(0, 3, (2, 4, 8, 16))), r"query: expected a floating dtype"),
        (dict(key=torch.randn(2, 4, 10, 8)), r"key: head dim must equal query's head dim 16"),
        (dict(value=torch.randn(2, 4, 11, 16)), r"value: expected \(\.\.\., Hkv, Lk, Dv\)"),
        (dict(key=torch.randn(3, 4, 10, 16)), r"key: batch dims .* do not broadcast"),
        (dict(key=torch.randn(2, 2, 10, 16), value=torch.randn(2, 2, 10, 16)), r"key: query has 4 heads but key has 2"),
        (dict(key=torch.randn(2, 3, 10, 16), value=torch.randn(2, 3, 10, 16), enable_gqa=True),
         r"key: query heads \(4\) must be a multiple"),
        (dict(attn_mask=torch.ones(2, 4, 8, 9, dtype=torch.bool)), r"attn_mask: expected a shape broadcastable"),
        (dict(attn_mask=torch.ones(8, 10, dtype=torch.int32)), r"attn_mask: expected dtype torch.bool \(True = attend\), or an\s+additive float32"),
        (dict(attn_mask=torch.ones(8, 10, dtype=torch.float64)), r"attn_mask: expected dtype"),
        (dict(dropout_p=1.5), r"dropout_p: expected a float in \[0, 1\]"),
        (dict(dropout_p=-0.1), r"dropout_p"),
        (dict(scale="x"), r"scale: expected a float"),
    ],
    ids=["rank", "rank-mismatch",
         "dtype-mismatch", "int-dtype", "head-dim", "value-len", "batch", "heads-no-gqa", "heads-not-multiple",
         "mask-shape", "mask-int", "mask-dtype", "dropout-above-1", "dropout-neg", "scale"],
)
def test_bad_inputs(over, match):
    with pytest.raises(ValueError, match=match):
        mk.attention(**_bad(**over))


@pytest.mark.gpu
def test_device_mismatch_cuda():
    q = torch.randn(1, 1, 4, 16, device="cuda")
    with pytest.raises(ValueError, match="key: expected dtype torch.float32 on cuda"):
        mk.attention(q, q.cpu(), q)


def test_compile_fullgraph_with_fallback():
    """A fallback inside a compiled graph (head dim 264 → sdpa) must not break the graph."""
    dispatch._warned.clear()
    q, k, v = _inputs(1, 2, 2, 5, 7, 264, torch.float32)
    compiled = torch.compile(lambda q, k, v: mk.attention(q, k, v), fullgraph=True, backend="aot_eager")
    assert_close_abs("fallback compiled", compiled(q, k, v),
                     torch.nn.functional.scaled_dot_product_attention(q, k, v), 1e-6)
