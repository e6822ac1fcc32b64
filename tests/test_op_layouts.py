"""Every custom op on the layouts models really pass: opcheck, and inductor fwd + bwd vs eager.

The class of bug this guards against: a fake kernel whose output strides differ from the real
kernel's.  ``opcheck`` and a forward-only compile on contiguous inputs both pass; inductor's
``assert_size_stride`` then fails at run time in the *backward* of a model that passes
transposed (B, L, H, D) views — exactly what HF's attention interface does.  So each op runs
here on transposed views, strided slices (``enc[:, 1:]``), batch-1 expanded inputs, and
fp32/bf16, compiled with the default (inductor) backend forward **and** backward.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs

import mmkernels as mk

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


# ------------------------------------------------------------------------------- layouts
def _attention_inputs(layout: str, dtype):
    b, h, lq, lk, d = 2, 3, 33, 21, 64
    if layout == "transposed":  # HF: q.view(B, L, H, D).transpose(1, 2)
        mk_ = lambda length: _leaf(torch.randn(b, length, h, d, device=DEVICE, dtype=dtype)).transpose(1, 2)
    elif layout == "strided":  # a slice of a wider tensor: row stride > D, batch offset
        mk_ = lambda length: _leaf(torch.randn(b, h, length + 1, d + 8, device=DEVICE, dtype=dtype))[:, :, 1:, :d]
    elif layout == "expanded":  # batch-1 broadcast
        mk_ = lambda length: _leaf(torch.randn(1, h, length, d, device=DEVICE, dtype=dtype)).expand(b, -1, -1, -1)
    else:
        mk_ = lambda length: _leaf(torch.randn(b, h, length, d, device=DEVICE, dtype=dtype))
    return mk_(lq), mk_(lk), mk_(lk)


def _leaves(*views):
    """The leaf tensor behind each input view (gradients land there)."""
    return [v if v.is_leaf else v._base for v in views]


LAYOUTS = ["transposed", "strided", "expanded"]


def _compare_compiled(fn, inputs, dtype, name):
    """Run ``fn`` eagerly and compiled (inductor, fullgraph); compare outputs and the grads of
    every leaf behind ``inputs``."""
    leaves = _leaves(*inputs)
    out = fn(*inputs)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    out_c = compiled(*inputs)
    grads_c = torch.autograd.grad(out_c, leaves, do)
    assert_close_abs(f"{name} out", out_c.float(), out.float(), TOL[dtype])
    for i, (g, gc) in enumerate(zip(grads, grads_c)):
        assert gc.shape == g.shape
        assert_close_abs(f"{name} grad {i}", gc.float(), g.float(), TOL[dtype] * max(1.0, float(g.abs().max())))


# ------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_compiled_fwd_bwd(layout, dtype):
    q, k, v = _attention_inputs(layout, dtype)

    def f(q, k, v):
        with mk.use_backend("triton"):
            return mk.attention(q, k, v, is_causal=True)

    _compare_compiled(f, (q, k, v), dtype, f"attention[{layout}]")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_attention_opcheck(layout):
    q, k, v = _attention_inputs(layout, torch.float32)
    fwd = torch.ops.mmkernels.attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, None, None, 0.0, True, 0.125))
    with torch.no_grad():
        out, lse = fwd(q, k, v, None, None, 0.0, True, 0.125)
    do = torch.randn(out.shape[0], out.shape[2], out.shape[1], out.shape[3], device=DEVICE).transpose(1, 2)
    q, k, v = (x.detach() for x in (q, k, v))
    torch.library.opcheck(torch.ops.mmkernels.attention_bwd.default,
                          (do, q, k, v, out, lse, None, None, 0.0, True, 0.125))


# ------------------------------------------------------------------------------- Q-Former
def _qformer_inputs(layout: str, dtype):
    b, lq, lk, dq, dkv, heads = 2, 8, 19, 32, 24, 2

    def p(*shape):
        return _leaf(torch.randn(*shape, device=DEVICE, dtype=dtype) * 0.2)

    x = p(b, lq, dq)
    if layout == "strided":  # image features minus CLS: enc[:, 1:]
        enc = p(b, lk + 1, dkv)[:, 1:]
    elif layout == "expanded":  # one image broadcast over a batch of queries
        enc = p(1, lk, dkv)
    else:  # "transposed": features stored (Lk, B, C) as timm / nn.MultiheadAttention keep them
        enc = p(lk, b, dkv).transpose(0, 1)
    wq = p(dq, dq).t() if layout == "transposed" else p(dq, dq)  # a tied / transposed weight view
    return x, enc, wq, p(dq), p(dq, dkv), p(dq), p(dq, dkv), p(dq), heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qformer_compiled_fwd_bwd(layout, dtype):
    *tensors, heads = _qformer_inputs(layout, dtype)

    def f(*t):
        with mk.use_backend("triton"):
            return mk.qformer_cross_attention(*t, num_heads=heads)

    _compare_compiled(f, tuple(tensors), dtype, f"qformer[{layout}]")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qformer_opcheck(layout):
    *tensors, heads = _qformer_inputs(layout, torch.float32)
    fwd = torch.ops.mmkernels.qformer_cross_attention_fwd.default
    torch.library.opcheck(fwd, (*tensors, None, None, heads, 0.0, 0.25))


# ----------------------------------------------------------------------------- token_pool
def _pool_inputs(layout: str, dtype):
    b, h, w, c = 2, 6, 6, 24
    if layout == "transposed":  # (B, C, N) storage viewed as (B, N, C), as after a conv
        x = _leaf(torch.randn(b, c, h * w, device=DEVICE, dtype=dtype)).transpose(1, 2)
    elif layout == "strided":  # vision tower output minus CLS
        x = _leaf(torch.randn(b, h * w + 1, c, device=DEVICE, dtype=dtype))[:, 1:]
    else:
        x = _leaf(torch.randn(1, h * w, c, device=DEVICE, dtype=dtype)).expand(b, -1, -1)
    weight = _leaf(torch.randn(c, device=DEVICE, dtype=dtype))
    return x, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_token_pool_compiled_fwd_bwd(layout, dtype):
    x, weight = _pool_inputs(layout, dtype)

    def f(x, weight):
        with mk.use_backend("triton"):
            return mk.token_pool(x, mode="avg", kernel_size=2, norm="rmsnorm", norm_weight=weight)

    _compare_compiled(f, (x, weight), dtype, f"token_pool[{layout}]")
