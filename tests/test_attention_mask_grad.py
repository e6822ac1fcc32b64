"""Gradient of a learnable float ``attn_mask`` combined with ``is_causal`` on the Triton path.

The dQ kernel writes the mask gradient (dS) and skips the key tiles above the causal band; the
entries there must still come out exactly 0 (SDPA: a position hidden by ``is_causal`` sends no
gradient into the additive mask), never uninitialised memory.  Every case runs with outputs
NaN-poisoned, compares against float64, and is rerun unpoisoned to check it is bitwise stable.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, poisoned

import mmkernels as mk
from mmkernels.reference.attention import attention as ref_attention

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, H = 2, 2
SHAPES = [(64, 100), (128, 128), (1, 239), (17, 113), (100, 64)]
MASKS = {"full": lambda lq, lk: (B, H, lq, lk), "keys": lambda lq, lk: (B, 1, 1, lk),
         "shared": lambda lq, lk: (1, 1, lq, lk)}


def _triton_grads(q, k, v, mask, do, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, mask)]
    with mk.use_backend("triton"):
        out = mk.attention(*leaves[:3], attn_mask=leaves[3], is_causal=True, **kw)
    return out, torch.autograd.grad(out, leaves, do)


def _reference_grads(q, k, v, mask, do, **kw):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, mask)]
    out = ref_attention(*leaves[:3], attn_mask=leaves[3], is_causal=True, **kw)
    return out, torch.autograd.grad(out, leaves, do.double())


def _hidden(mask_shape, lq, lk):
    """Bool, shaped like the mask: True where every position it feeds is hidden by is_causal."""
    above = ~torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril()
    if mask_shape[-2] == 1:
        above = above.all(dim=0, keepdim=True)
    return above.expand(mask_shape)


def _check(lq, lk, d, mask_kind, mask=None, **kw):
    q = torch.randn(B, H, lq, d, device=DEVICE)
    k = torch.randn(B, H, lk, d, device=DEVICE)
    v = torch.randn(B, H, lk, d, device=DEVICE)
    if mask is None:
        mask = torch.randn(MASKS[mask_kind](lq, lk), device=DEVICE)
    do = torch.randn(B, H, lq, d, device=DEVICE)
    with poisoned():
        out, grads = _triton_grads(q, k, v, mask, do, **kw)
    out64, grads64 = _reference_grads(q, k, v, mask, do, **kw)
    assert_close_abs("out", out, out64, 2e-5)
    for name, g, g64 in zip(("dq", "dk", "dv", "dmask"), grads, grads64):
        assert g.shape == g64.shape, name
        bad = int((~torch.isfinite(g)).sum())
        assert bad == 0, f"{name}: {bad} non-finite elements"
        assert_close_abs(name, g, g64, 2e-5 * max(1.0, float(g64.abs().max())))
    hidden = _hidden(mask.shape, lq, lk)
    assert (grads[3][hidden] == 0).all(), "dmask must be exactly 0 where is_causal hides every position"
    # a second, unpoisoned run (uninitialised buffers) must give the same bits
    out2, grads2 = _triton_grads(q, k, v, mask, do, **kw)
    assert torch.equal(out, out2)
    for name, g, g2 in zip(("dq", "dk", "dv", "dmask"), grads, grads2):
        assert torch.equal(g, g2), f"{name}: differs between two runs"
    return grads


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("lq,lk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_causal_mask_grad_above_diagonal_is_zero(lq, lk, mask_kind):
    _check(lq, lk, 64, mask_kind)


@pytest.mark.parametrize("mask_kind", ["full", "keys"])
def test_causal_mask_grad_split_head_dim(mask_kind):
    _check(64, 100, 72, mask_kind)  # d = 72 runs the two-chunk (64 + 16) head-dim path


def test_causal_mask_grad_fully_masked_rows_and_columns():
    """-inf rows / columns of the mask on top of is_causal: their gradient is 0 as well."""
    lq, lk = 64, 100
    mask = torch.randn(B, H, lq, lk, device=DEVICE)
    mask[0, 1, 5] = float("-inf")  # a query row that sees nothing
    mask[1, 0, :, 3] = float("-inf")  # a key column nobody sees
    mask[:, :, 40:, :2] = float("-inf")  # partly hidden rows
    grads = _check(lq, lk, 64, "full", mask=mask)
    dmask = grads[3]
    assert (dmask[0, 1, 5] == 0).all() and (dmask[1, 0, :, 3] == 0).all()


def test_causal_mask_grad_with_dropout():
    """Dropout + is_causal + learnable mask: the keep mask is read off a V = identity probe."""
    p, lq, lk, d = 0.3, 64, 100, 128
    q = torch.randn(B, H, lq, d, device=DEVICE)
    k = torch.randn(B, H, lk, d, device=DEVICE)
    v = torch.zeros(B, H, lk, d, device=DEVICE)
    v[..., torch.arange(lk), torch.arange(lk)] = 1.0
    mask = torch.randn(B, 1, 1, lk, device=DEVICE)
    do = torch.randn(B, H, lq, d, device=DEVICE)
    torch.manual_seed(7)
    with poisoned():
        out, grads = _triton_grads(q, k, v, mask, do, dropout_p=p)
    keep = out[..., :lk] != 0
    out64, grads64 = _reference_grads(q, k, v, mask, do, dropout_p=p, dropout_mask=keep)
    assert_close_abs("out", out, out64, 2e-5)
    for name, g, g64 in zip(("dq", "dk", "dv", "dmask"), grads, grads64):
        bad = int((~torch.isfinite(g)).sum())
        assert bad == 0, f"{name}: {bad} non-finite elements"
        assert_close_abs(name, g, g64, 2e-5 * max(1.0, float(g64.abs().max())))
    assert (grads[3][_hidden(mask.shape, lq, lk)] == 0).all()
    torch.manual_seed(7)
    out2, grads2 = _triton_grads(q, k, v, mask, do, dropout_p=p)
    assert torch.equal(out, out2)
    for name, g, g2 in zip(("dq", "dk", "dv", "dmask"), grads, grads2):
        assert torch.equal(g, g2), f"{name}: differs between two runs"
