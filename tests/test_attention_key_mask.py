"""Key-padding masks as key spans (issue 20 item 3).

A mask that only masks keys — (B, 1, 1, Lk), or a view broadcast over heads and queries — runs
the kernels' MASK_KIND 3 (bool) / 4 (additive): per batch row the keys past the last kept one
are never visited and the leading run of keys kept with no bias runs mask-free
(``_tiles.key_spans``), the rest reads one mask value per key.  Each case compares output and
gradients with float64 (the 2x rule of tests/test_attention.py) and checks the spans.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from test_attention import _inputs, check

import mmkernels as mk
from mmkernels.kernels._tiles import _mask_args, key_spans

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, H, LQ, LK = 4, 2, 45, 77
# per batch row: all keys, ragged prefixes (one inside the first key tile), none
LENGTHS = (77, 40, 9, 0)


def _keep(lengths=LENGTHS, lk=LK, left=False):
    keep = torch.arange(lk, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    return keep.flip(-1) if left else keep


def _mask(kind, keep, dtype=torch.float32):
    if kind == "bool":
        return keep[:, None, None, :]
    floor = {"-inf": float("-inf"), "finfo": torch.finfo(dtype).min}[kind]
    return torch.where(keep, 0.0, floor).to(dtype)[:, None, None, :]


@pytest.mark.parametrize("kind", ["bool", "-inf", "finfo"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_padding_mask_spans(kind, causal):
    q, k, v = _inputs(B, H, H, LQ, LK, 72, torch.float32)
    # with "finfo" the last row (length 0) is all finfo.min: a uniform softmax (SDPA's math), not skipped
    check(q, k, v, attn_mask=_mask(kind, _keep()), is_causal=causal)


def test_spans_values():
    keep = _keep()
    m, kind, _ = _mask_args(_mask("bool", keep), B, H, LQ, LK, torch.empty(0), key_only=True)
    assert kind == 3
    assert key_spans(m).tolist() == [[77, 77], [40, 40], [9, 9], [0, 0]]
    # additive: -inf drops keys, finfo.min drops them only next to a key above -1e29, other values are bias
    add = torch.zeros(3, LK, device=DEVICE)
    add[0, 50:] = float("-inf")
    add[0, 10] = -2.0  # a biased key ends the mask-free lead
    add[1, :] = torch.finfo(torch.float32).min  # all finfo.min: uniform softmax, every key visited
    add[2, 60:] = torch.finfo(torch.float32).min
    add[2, 5] = float("-inf")
    m, kind, _ = _mask_args(add[:, None, None, :], 3, H, LQ, LK, torch.empty(0), key_only=True)
    assert kind == 4
    assert key_spans(m).tolist() == [[50, 10], [77, 0], [60, 5]]
    # fp16's finfo.min (-65504) stays a bias: visited, read on the edge tiles
    half = torch.where(_keep()[:1], 0.0, torch.finfo(torch.float16).min).to(torch.float16)
    m, _, _ = _mask_args(half[:, None, None, :], 1, H, LQ, LK, torch.empty(0), key_only=True)
    assert key_spans(m).tolist() == [[77, 77]]


@pytest.mark.parametrize("shape", [(B, 1, 1, LK), (B, H, LQ, LK), (1, 1, LK), (LK,)],
                         ids=["B11L", "expanded", "11L", "L"])
def test_key_only_detection(shape):
    keep = _keep()[:1] if shape[0] != B else _keep()
    base = keep[:, None, None, :] if len(shape) == 4 else keep.reshape(shape)
    mask = base.expand(shape)  # a stride-0 view over heads and queries is key-only too
    m, kind, _ = _mask_args(mask, B, H, LQ, LK, torch.empty(0), key_only=True)
    assert kind == 3
    m, kind, _ = _mask_args(mask, B, H, LQ, LK, torch.empty(0))
    assert kind == 1  # other kernels (scores, Q-Former) keep the general path


def test_left_padding_and_random_keys():
    """Not a prefix: every tile up to the last kept key reads the mask (no lead)."""
    q, k, v = _inputs(B, H, H, LQ, LK, 88, torch.float32)
    check(q, k, v, attn_mask=_mask("bool", _keep(left=True)))
    check(q, k, v, attn_mask=torch.rand(B, 1, 1, LK, device=DEVICE) > 0.5, is_causal=True)
    bias = torch.randn(B, 1, 1, LK, device=DEVICE)
    bias[..., 60:] = float("-inf")
    check(q, k, v, attn_mask=bias)


def test_gqa_dropout_low_precision():
    q, k, v = _inputs(B, 4, 2, LQ, LK, 80, torch.bfloat16)
    check(q, k, v, attn_mask=_mask("bool", _keep()), enable_gqa=True)
    with mk.use_backend("triton"):
        torch.manual_seed(3)
        a = mk.attention(q, k, v, attn_mask=_mask("bool", _keep()), enable_gqa=True, dropout_p=0.3)
        torch.manual_seed(3)
        general = _mask("bool", _keep()).expand(B, 4, LQ, LK).contiguous()  # not key-only: MASK_KIND 1
        b = mk.attention(q, k, v, attn_mask=general, enable_gqa=True, dropout_p=0.3)
    # the key-span path and the general mask path draw the same Philox bits for the keys they share
    torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


def test_mask_grad_with_key_only_additive_mask():
    """A mask that requires grad takes the general path (its dS covers every key)."""
    q, k, v = _inputs(2, H, H, LQ, LK, 64, torch.float32)
    bias = torch.randn(2, 1, 1, LK, device=DEVICE)
    bias[1, ..., 30:] = float("-inf")
    bias.requires_grad_()
    with mk.use_backend("triton"):
        out = mk.attention(q, k, v, attn_mask=bias)
        g, = torch.autograd.grad(out.sum(), bias)
    b64 = bias.detach().double().requires_grad_()
    out64 = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=b64)
    g64, = torch.autograd.grad(out64.sum(), b64)
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=0)
    torch.testing.assert_close(g.double(), g64, atol=1e-5, rtol=0)


def test_nan_at_skipped_keys_propagates_as_sdpa_math():
    """SDPA's math adds the mask to the logits: a NaN key or value poisons its head even where
    the mask hides it.  The kernels never visit keys past a row's span; the op layer adds it."""
    q, k, v = _inputs(2, H, H, LQ, LK, 64, torch.float32)
    mask = _mask("-inf", _keep((77, 20)))
    with torch.no_grad():
        k[1, 0, 50] = float("nan")
        v[1, 1, 60, 3] = float("nan")
    with mk.use_backend("triton"):
        out = mk.attention(q.detach(), k.detach(), v.detach(), attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q.detach().double(), k.detach().double(),
                                                           v.detach().double(), attn_mask=mask.double())
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
