"""NaN / Inf semantics of ``mk.attention``: on every backend, SDPA's math backend (float64) is the
ground truth — which output elements are NaN, and the finite values elsewhere.

The rule (``mk.attention``'s docstring, docs/design.md "NaN and Inf"), checked here against math
itself (``_rule``) and then on each backend:

* a NaN in query row i → row i of that head (also when a bool mask hides all its keys);
* a NaN in key j → every element of the heads reading that key head, whatever hides j (is_causal,
  a bool False, a float -inf: math adds the mask, NaN + -inf = NaN);
* a NaN in value (j, d) → column d of every row of those heads (masked probabilities are exact
  zeros, and 0·NaN = NaN);
* a float mask entry (i, j) that is NaN or +inf → row i (+inf: inf - inf in the softmax), also
  above the causal diagonal (+inf + -inf = NaN); -inf is the ordinary "masked".

The Triton kernels skip key tiles above the causal band and select masked logits away: the op
layer adds those NaN from a pre-pass over K and V (``ops.attention._math_nans``).  With the
interpreter's 64-row query blocks, Lq = 17 is one block; the (97, 97) causal case has a second
block, so block 0 skips keys 64..96.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch.nn.attention import SDPBackend, sdpa_kernel

import mmkernels as mk

# the interpreter warns on the NaN arithmetic these cases are about
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

NAN, INF = float("nan"), float("inf")
BACKENDS = ["triton", "sdpa", "reference"]
B, H = 2, 2
BAD_B, BAD_H = 0, 1  # the (batch, head) holding the bad q / k / v element
ROW = 5  # the query row of q and mask cases

# case → (what holds the bad value, the bad value, how key j is hidden from every row)
CASES = {
    "q_nan": ("q", NAN, None),
    "q_nan_row_all_masked": ("q", NAN, "row"),  # bool mask hides every key of ROW
    "k_nan": ("k", NAN, None),
    "k_nan_bool_hidden": ("k", NAN, "bool"),
    "k_nan_float_hidden": ("k", NAN, "float"),
    "v_nan": ("v", NAN, None),
    "v_nan_bool_hidden": ("v", NAN, "bool"),
    "v_nan_row_all_masked": ("v", NAN, "row"),
    "mask_nan": ("mask", NAN, None),
    "mask_posinf": ("mask", INF, None),
    "mask_neginf": ("mask", -INF, None),
}


def _inputs(case, lq, lk, d, j, hk=H):
    where, bad, hide = CASES[case]
    q = torch.randn(B, H, lq, d, device=DEVICE)
    k = torch.randn(B, hk, lk, d, device=DEVICE)
    v = torch.randn(B, hk, lk, d, device=DEVICE)
    mask = None
    if hide == "bool":
        mask = torch.ones(lq, lk, dtype=torch.bool, device=DEVICE)
        mask[:, j] = False
    elif hide == "row":
        mask = torch.ones(lq, lk, dtype=torch.bool, device=DEVICE)
        mask[ROW] = False
    elif hide == "float":
        mask = torch.zeros(lq, lk, device=DEVICE)
        mask[:, j] = -INF
    if where == "q":
        q[BAD_B, BAD_H, ROW, 3] = bad
    elif where == "k":
        k[BAD_B, BAD_H * hk // H, j, 3] = bad
    elif where == "v":
        v[BAD_B, BAD_H * hk // H, j, 3] = bad
    else:
        mask = torch.zeros(B, 1, lq, lk, device=DEVICE)
        mask[BAD_B, 0, ROW, j] = bad
    return q, k, v, mask


def _math(q, k, v, mask, causal):
    """SDPA's math backend in float64; is_causal with a mask is made explicit (SDPA refuses the
    pair) the way math applies is_causal itself: -inf added above the diagonal."""
    q, k, v = q.double(), k.double(), v.double()
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    if mask is not None and causal:
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        if mask.dtype == torch.bool:
            mask = mask & tril
        else:
            mask = mask + torch.zeros(tril.shape, dtype=mask.dtype, device=q.device).masked_fill(~tril, -INF)
        causal = False
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _rule(case, lq, d, hk=H):
    """The documented NaN pattern (B, H, Lq, d) of a case: the same whatever the mask or causal."""
    where, bad, _ = CASES[case]
    nan = torch.zeros(B, H, lq, d, dtype=torch.bool, device=DEVICE)
    group = H // hk
    heads = slice(BAD_H // group * group, BAD_H // group * group + group)  # the query heads of the bad kv head
    if where == "q":
        nan[BAD_B, BAD_H, ROW] = True
    elif where == "k":
        nan[BAD_B, heads] = True
    elif where == "v":
        nan[BAD_B, heads, :, 3] = True
    elif bad != -INF:
        nan[BAD_B, :, ROW] = True
    return nan


def _check(backend, case, causal, lq, lk, d, j, hk=H):
    q, k, v, mask = _inputs(case, lq, lk, d, j, hk)
    expected = _math(q, k, v, mask, causal)
    rule = _rule(case, lq, d, hk)
    assert torch.equal(torch.isnan(expected), rule), "SDPA math's NaN pattern is not the documented rule"
    with mk.use_backend(backend):
        out = mk.attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hk != H)
    got = torch.isnan(out)
    assert torch.equal(got, rule), (
        f"NaN pattern: {int(got.sum())} NaN, expected {int(rule.sum())}; "
        f"extra at {(got & ~rule).nonzero()[:4].tolist()}, missing at {(rule & ~got).nonzero()[:4].tolist()}")
    err = (out[~rule].double() - expected[~rule]).abs().max()
    assert err <= 1e-5, f"finite values: max abs error {float(err):.3g}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case,j", [(c, j) for c in CASES for j in ((3,) if CASES[c][0] == "q" else (3, 20))],
                         ids=lambda x: x if isinstance(x, str) else f"key{x}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pattern(backend, case, causal, j):
    """B=2, H=2, Lq=17, Lk=33, d=64: key 3 is visible to rows >= 3 under is_causal, key 20 (and
    mask column 20) to no row."""
    _check(backend, case, causal, 17, 33, 64, j)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", ["q_nan", "k_nan_bool_hidden", "v_nan", "mask_nan", "mask_posinf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pattern_d72(backend, case, causal):
    """Head dim 72 (two chunks, 64 + 16, on Triton)."""
    _check(backend, case, causal, 17, 33, 72, 20)


@pytest.mark.parametrize("case", ["k_nan", "v_nan", "mask_nan", "mask_posinf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pattern_skipped_tiles(backend, case):
    """Causal, Lq = Lk = 97: the first 64-row query block never visits keys 64..96 on Triton, and
    the NaN at key / mask column 80 must still reach it."""
    _check(backend, case, True, 97, 97, 32, 80)


@pytest.mark.parametrize("case", ["k_nan", "v_nan_bool_hidden"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_pattern_gqa(backend, case):
    """enable_gqa (2 query heads on 1 kv head), causal: a bad kv head reaches all its query heads."""
    _check(backend, case, True, 17, 33, 64, 20, hk=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_row_is_zero(backend):
    """The documented behaviour of a row whose keys are all masked (finite inputs): 0, as torch's
    math backend now gives too (older torch gave NaN)."""
    q, k, v, mask = _inputs("q_nan_row_all_masked", 17, 33, 64, 3)
    q[BAD_B, BAD_H, ROW, 3] = 0.5
    with mk.use_backend(backend):
        out = mk.attention(q, k, v, attn_mask=mask, is_causal=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :, ROW], torch.zeros_like(out[:, :, ROW]))
    expected = _math(q, k, v, mask, True)
    assert (out.double() - expected).abs().max() <= 1e-5
