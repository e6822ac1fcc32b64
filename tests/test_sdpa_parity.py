"""SDPA parity: ``mk.attention`` and ``F.scaled_dot_product_attention`` driven through the same
cases — every input form SDPA accepts — with the Triton backend forced where it should run.

Each case compares mmkernels with SDPA run in float64 on the same inputs; mmkernels' error must
be at most 2× the error of PyTorch in the same dtype (plus a few-ulp floor), forward and
gradients — "PyTorch" being the larger of SDPA's error and plain PyTorch math's (on CPU, SDPA's
fused kernels keep P in fp32, stricter than any GPU flash kernel, which rounds P to the input
dtype before P·V as mmkernels does).
The cases come from gaps that peers' test grids (flash-attn, xformers, PyTorch's SDPA tests)
found: head dims that are not multiples of 8, Dv != D, leading batch dims, float32 masks with
half inputs, ``CausalBias`` objects, batch broadcast, mask + is_causal, dropout_p = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import FLOOR, worst
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import mmkernels as mk

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass(frozen=True)
class Case:
    name: str
    q: tuple
    k: tuple
    dv: int | None = None  # value head dim (None: = D)
    dtype: torch.dtype = torch.float32
    mask: str | None = None  # see _mask
    is_causal: bool = False
    gqa: bool = False
    backend: str | None = "triton"
    grad: bool = True
    kw: dict = field(default_factory=dict)

    def __str__(self):
        return self.name


def _mask(kind, lq, lk, dtype):
    if kind is None:
        return None
    if kind == "bool1d":
        m = torch.rand(lk, device=DEVICE) > 0.3
        m[0] = True
        return m
    if kind == "float1d":
        return torch.randn(lk, device=DEVICE, dtype=dtype)
    if kind == "bool2d":
        m = torch.rand(lq, lk, device=DEVICE) > 0.3
        m[:, 0] = True
        return m
    if kind == "f32_2d":  # float32 additive mask with half inputs
        return torch.randn(lq, lk, device=DEVICE, dtype=torch.float32)
    if kind == "pad4d":  # HF padding (B, 1, 1, Lk)
        m = torch.zeros(2, 1, 1, lk, device=DEVICE, dtype=dtype)
        m[1, ..., lk // 2:] = torch.finfo(dtype).min
        return m
    if kind == "causal_ul":
        return causal_upper_left(lq, lk)
    if kind == "causal_lr":
        return causal_lower_right(lq, lk)
    raise AssertionError(kind)


CASES = [
    # head dims that are not multiples of 8 (flash-attn serves every d <= 256 by padding inside)
    Case("d4", (2, 2, 17, 4), (2, 2, 23, 4)),
    Case("d6_causal", (1, 2, 33, 6), (1, 2, 33, 6), is_causal=True),
    Case("d12_fp16", (1, 3, 19, 12), (1, 3, 40, 12), dtype=torch.float16),
    Case("d33_bf16", (2, 1, 21, 33), (2, 1, 21, 33), dtype=torch.bfloat16),
    # value head dim != query/key head dim
    Case("dv_narrow", (2, 2, 17, 64), (2, 2, 29, 64), dv=24),
    Case("dv_wide", (1, 2, 13, 24), (1, 2, 13, 24), dv=40, is_causal=True),
    # any number of leading batch dims
    Case("rank2", (17, 16), (23, 16)),
    Case("rank3", (3, 17, 16), (3, 23, 16)),
    Case("rank5", (2, 2, 2, 9, 16), (2, 2, 2, 11, 16)),
    # batch broadcast: query batch 1 against key/value batch 2, and the reverse
    Case("q_batch1", (1, 2, 9, 16), (2, 2, 11, 16)),
    Case("kv_batch1", (2, 2, 9, 16), (1, 2, 11, 16)),
    # masks SDPA accepts
    Case("mask_bool_1d", (2, 2, 9, 16), (2, 2, 11, 16), mask="bool1d"),
    Case("mask_float_1d", (2, 2, 9, 16), (2, 2, 11, 16), mask="float1d"),
    Case("mask_f32_bf16", (2, 2, 9, 32), (2, 2, 11, 32), dtype=torch.bfloat16, mask="f32_2d"),
    Case("mask_f32_fp16", (2, 2, 9, 32), (2, 2, 11, 32), dtype=torch.float16, mask="f32_2d"),
    Case("mask_hf_pad_fp16", (2, 2, 9, 32), (2, 2, 11, 32), dtype=torch.float16, mask="pad4d"),
    Case("causal_bias_ul", (2, 2, 9, 16), (2, 2, 13, 16), mask="causal_ul"),
    Case("causal_bias_lr", (2, 2, 9, 16), (2, 2, 13, 16), mask="causal_lr"),
    Case("causal_bias_lr_bf16", (1, 2, 17, 32), (1, 2, 40, 32), dtype=torch.bfloat16, mask="causal_lr"),
    Case("mask_and_causal", (2, 2, 13, 16), (2, 2, 13, 16), mask="bool2d", is_causal=True),
    Case("float_mask_and_causal_fp16", (2, 2, 13, 32), (2, 2, 13, 32), dtype=torch.float16, mask="f32_2d",
         is_causal=True),
    # bf16 backward with Lq >> Lk (PyTorch's flash_attention_vs_math_ref_grads; uniform inputs):
    # dK sums dS over many query blocks
    Case("bf16_lq_gg_lk_d192", (1, 2, 256, 192), (1, 2, 8, 192), dtype=torch.bfloat16, kw=dict(uniform=True)),
    Case("bf16_143x64_d8", (1, 2, 143, 8), (1, 2, 64, 8), dtype=torch.bfloat16, kw=dict(uniform=True)),
    Case("bf16_lq_gg_lk_gqa", (1, 4, 256, 64), (1, 2, 8, 64), dtype=torch.bfloat16, gqa=True, kw=dict(uniform=True)),
    # fp16 backward overflow probe (flash-attn's test_flash_attn_bwd_overflow: q x5, k/v x3)
    Case("fp16_bwd_overflow", (2, 2, 2, 32), (2, 2, 2, 32), dtype=torch.float16, kw=dict(q_scale=5.0, kv_scale=3.0)),
    # grouped-query attention
    Case("gqa", (2, 4, 9, 16), (2, 2, 11, 16), gqa=True),
    # the same input forms in auto mode (on CPU without the interpreter: SDPA / the reference)
    Case("auto_float_mask_and_causal_fp16", (2, 2, 13, 32), (2, 2, 13, 32), dtype=torch.float16,
         mask="f32_2d", is_causal=True, backend=None),
    Case("auto_rank3_d12", (3, 17, 12), (3, 23, 12), backend=None),
    Case("auto_dropout_1", (2, 2, 9, 16), (2, 2, 11, 16), backend=None, grad=False, kw=dict(dropout_p=1.0)),
]


def _sdpa64(q, k, v, kw):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    kw = dict(kw)
    mask = kw["attn_mask"]
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool and not hasattr(mask, "variant"):
        kw["attn_mask"] = mask.double()
    return F.scaled_dot_product_attention(q64, k64, v64, **kw), (q64, k64, v64)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity(case):
    lq, lk = case.q[-2], case.k[-2]
    dv = case.dv or case.k[-1]
    kw = dict(case.kw)
    draw = torch.rand if kw.pop("uniform", False) else torch.randn
    qs, kvs = kw.pop("q_scale", 1.0), kw.pop("kv_scale", 1.0)

    def leaf(shape, s):
        return (draw(shape, device=DEVICE) * s).to(case.dtype).requires_grad_()

    q, k, v = leaf(case.q, qs), leaf(case.k, kvs), leaf((*case.k[:-1], dv), kvs)
    mask = _mask(case.mask, lq, lk, case.dtype)
    kw = dict(attn_mask=mask, is_causal=case.is_causal, enable_gqa=case.gqa, **kw)
    out = mk.attention(q, k, v, backend=case.backend, **kw)
    if isinstance(mask, torch.Tensor) and mask.dim() == 1:  # SDPA itself fails on a 1-D mask (IndexError)
        kw["attn_mask"] = mask = mask[None]
    expected_shape = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), **kw).shape
    assert out.shape == expected_shape and out.dtype == case.dtype
    if case.kw.get("dropout_p") == 1.0:
        assert torch.equal(out, torch.zeros_like(out))
        return
    out_sdpa = F.scaled_dot_product_attention(q, k, v, **kw)
    out_math = mk.attention(q, k, v, backend="reference", **kw) if case.dtype == torch.float32 else \
        _plain_math(q, k, v, kw)
    out64, leaves64 = _sdpa64(q, k, v, kw)

    def check(name, mine, sdpa, math_, ref):
        err, idx = worst(mine, ref)
        base = max(worst(sdpa, ref)[0], worst(math_, ref)[0])
        bound = 2.0 * base + FLOOR[case.dtype] * max(1.0, float(ref.abs().max()))
        assert err <= bound, f"{case}: {name} error {err:.3g} at {idx} > 2x PyTorch's {base:.3g} (+floor)"

    check("out", out, out_sdpa, out_math, out64)
    if not case.grad:
        return
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads_sdpa = torch.autograd.grad(out_sdpa, (q, k, v), do)
    grads_math = torch.autograd.grad(out_math, (q, k, v), do)
    grads64 = torch.autograd.grad(out64, leaves64, do.double())
    for name, g, gs, gm, g64 in zip(("dq", "dk", "dv"), grads, grads_sdpa, grads_math, grads64):
        assert g.shape == g64.shape and g.dtype == case.dtype
        check(name, g, gs, gm, g64)


def _plain_math(q, k, v, kw):
    """Plain PyTorch math in the inputs' dtype (the flash-attn rule's baseline)."""
    from mmkernels.reference.attention import attention as ref_attention

    q4, k4, v4 = (x if x.dim() >= 3 else x[None] for x in (q, k, v))
    mask = kw["attn_mask"]
    if hasattr(mask, "variant"):  # CausalBias
        mask = mask._materialize(q.device)
    if isinstance(mask, torch.Tensor) and mask.dtype not in (torch.bool, q.dtype):
        mask = mask.to(q.dtype)
    out = ref_attention(q4, k4, v4, attn_mask=mask, is_causal=kw["is_causal"], enable_gqa=kw["enable_gqa"])
    return out if q.dim() >= 3 else out[0]


def test_causal_bias_wrong_lengths_names_the_mask():
    q = torch.randn(1, 1, 5, 8, device=DEVICE)
    k = torch.randn(1, 1, 7, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"attn_mask: a CausalBias for Lq=4, Lk=7"):
        mk.attention(q, k, k, attn_mask=causal_lower_right(4, 7))


@pytest.mark.parametrize("bad, match", [
    (dict(attn_mask=torch.zeros(5, 7, dtype=torch.float64)), r"attn_mask: expected dtype torch.bool"),
    (dict(attn_mask=torch.zeros(3, 5, 7, dtype=torch.bool)), r"attn_mask: expected a shape broadcastable"),
    (dict(dropout_p=1.5), r"dropout_p: expected a float in \[0, 1\]"),
])
def test_bad_input_names_the_argument(bad, match):
    q = torch.randn(2, 2, 5, 8, device=DEVICE)
    k = torch.randn(2, 2, 7, 8, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        mk.attention(q, k, k, **bad)


def test_rank_mismatch_raises():
    with pytest.raises(ValueError, match="key: expected 4 dims like query"):
        mk.attention(torch.randn(1, 2, 5, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 8))


@pytest.mark.parametrize("shape", [(1, 3, 13, 21), (2, 1, 13, 21), (13, 21)], ids=["per-head", "per-batch", "2-D"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_learnable_mask_gradient(shape, dtype):
    """A float attn_mask that requires grad (BEiT-style relative-position bias): its gradient is
    dS summed over the dims it broadcasts along, vs float64 SDPA, by the 2x rule."""
    q = torch.randn(2, 3, 13, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 3, 21, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 3, 21, 32, device=DEVICE, dtype=dtype, requires_grad=True)
    bias = torch.randn(shape, device=DEVICE, dtype=dtype, requires_grad=True)
    out = mk.attention(q, k, v, attn_mask=bias, is_causal=True, backend="triton")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), do)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v, bias)]
    # (SDPA itself refuses a mask that requires grad together with is_causal)
    out64 = mk.attention(*leaves64[:3], attn_mask=leaves64[3], is_causal=True, backend="reference")
    grads64 = torch.autograd.grad(out64, leaves64, do.double())
    leaves_lp = [x.detach().requires_grad_() for x in (q, k, v, bias)]
    out_lp = _plain_math(*leaves_lp[:3], dict(attn_mask=leaves_lp[3], is_causal=True, enable_gqa=False))
    grads_lp = torch.autograd.grad(out_lp, leaves_lp, do)
    for name, g, g64, glp in zip(("dq", "dk", "dv", "dmask"), grads, grads64, grads_lp):
        assert g.shape == g64.shape and g.dtype == dtype, name
        err, idx = worst(g, g64)
        base = worst(glp, g64)[0]
        bound = 2.0 * base + FLOOR[dtype] * max(1.0, float(g64.abs().max()))
        assert err <= bound, f"{name}: error {err:.3g} at {idx} > 2x PyTorch's {base:.3g}"
    assert grads[3].abs().sum() > 0


def test_learnable_mask_opcheck():
    q, k, v = (torch.randn(1, 2, 9, 16, device=DEVICE) for _ in range(3))
    bias = torch.randn(1, 2, 9, 9, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        out, lse = torch.ops.mmkernels.attention_fwd(q, k, v, bias, None, 0.0, False, 0.25)
    torch.library.opcheck(torch.ops.mmkernels.attention_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, bias.detach(), None, 0.0, False, 0.25, True))
    torch.library.opcheck(torch.ops.mmkernels.attention_fwd.default, (q, k, v, bias, None, 0.0, False, 0.25))
