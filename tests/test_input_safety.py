"""Inputs that must never corrupt memory or lie: bad ``cu_seqlens`` values and layouts, NaN/Inf
isolation between packed sequences, non-finite scales.

The bad-``cu_seqlens`` matrix: every pattern below under eager (every backend: ``ValueError``),
``torch.compile(fullgraph=True)`` (the device-side assertion: ``RuntimeError``) and straight into
the registered Triton ops, bypassing validation (no crash, every output finite and written,
the NaN guard rows around q/k/v never read, the same result twice).  A last entry below the
total is valid (rows past it are padding: tests/test_capture_contract.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, poisoned

import mmkernels as mk

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOTAL = 20
GOOD = [0, 5, 12, 20]
BAD_CU = {
    "non-monotonic": [0, 12, 5, 20],
    "negative": [0, -7, 12, 20],
    "past-the-end": [0, 5, 40, 20],
    "first-not-0": [3, 5, 12, 20],
    "last-past-total": [0, 5, 12, 25],
    "int32-extremes": [0, 2**31 - 1, -(2**31), 20],
}


def _cu(vals):
    return torch.tensor(vals, dtype=torch.int32, device=DEVICE)


def _guarded(total, h, d, guard=7, seed=0):
    """(view, buffer): a (total, h, d) tensor inside a NaN buffer with ``guard`` rows either side,
    so a read outside the view shows up as NaN in the result."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((total + 2 * guard, h, d), float("nan"), device=DEVICE)
    buf[guard:guard + total] = torch.randn(total, h, d, generator=g).to(DEVICE)
    return buf[guard:guard + total], buf


def _qkv(requires_grad=False):
    q, k, v = (torch.randn(TOTAL, 2, 16, device=DEVICE, requires_grad=requires_grad) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("pattern", list(BAD_CU))
@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
def test_bad_cu_seqlens_eager_raises(pattern, backend):
    q, k, v = _qkv()
    cu = _cu(BAD_CU[pattern])
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        mk.attention_varlen(q, k, v, cu, _cu(GOOD), backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        mk.attention_varlen(q, k, v, _cu(GOOD), cu, backend=backend)


def test_max_seqlen_hint_too_small_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="max_seqlen_q"):
        mk.attention_varlen(q, k, v, _cu(GOOD), _cu(GOOD), max_seqlen_q=7, max_seqlen_k=8)


@pytest.mark.parametrize("pattern", ["non-monotonic", "past-the-end", "last-past-total", "int32-extremes"])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_bad_cu_seqlens_compiled_asserts_on_device(pattern, backend):
    q, k, v = _qkv()

    def f(q, k, v, cu):
        return mk.attention_varlen(q, k, v, cu, cu, is_causal=True, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    good = compiled(q, k, v, _cu(GOOD))
    assert_close_abs("compiled good", good, f(q, k, v, _cu(GOOD)), 1e-6)
    with pytest.raises(RuntimeError, match="invalid cu_seqlens"):
        compiled(q, k, v, _cu(BAD_CU[pattern]))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pattern", list(BAD_CU))
def test_bad_cu_seqlens_straight_into_the_kernels(pattern, causal):
    """The registered ops skip validation: the kernels must stay inside their tensors anyway."""
    q, qbuf = _guarded(TOTAL, 2, 16, seed=1)
    k, kbuf = _guarded(TOTAL, 2, 16, seed=2)
    v, vbuf = _guarded(TOTAL, 2, 16, seed=3)
    before = [b.clone() for b in (qbuf, kbuf, vbuf)]
    cu = _cu(BAD_CU[pattern])
    ops = torch.ops.mmkernels
    results = []
    for _ in range(2):
        with poisoned():
            out, lse = ops.attention_varlen_fwd(q, k, v, cu, cu, None, None, None, None, None, 0.0, causal, 0.25)
            do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
            grads = ops.attention_varlen_bwd(do, q, k, v, out, lse, cu, cu, None, None, None, None, None, 0.0,
                                             causal, 0.25)
        for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
            assert torch.isfinite(t).all(), f"{pattern}: {name} has non-finite entries (unwritten or a guard row read)"
        results.append((out, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b), f"{pattern}: two runs differ"
    for b, b0 in zip((qbuf, kbuf, vbuf), before):
        assert torch.equal(b.isnan(), b0.isnan()) and torch.equal(b.nan_to_num(), b0.nan_to_num())


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
@pytest.mark.parametrize("layout", ["column-of-stack", "step-2", "offset"])
def test_strided_cu_seqlens(backend, layout):
    q, k, v = _qkv(requires_grad=True)
    good = _cu(GOOD)
    if layout == "column-of-stack":
        cu = torch.stack([good, good * 0 + 99], 1)[:, 0]
    elif layout == "step-2":
        cu = torch.stack([good, good * 0 - 5], 1).flatten()[::2]
    else:
        cu = torch.cat([_cu([77, -3]), good])[2:]
    assert not cu.is_contiguous() or cu.storage_offset() > 0
    assert torch.equal(cu, good)
    expected = mk.attention_varlen(q, k, v, good, good, is_causal=True, backend="reference")
    eg = torch.autograd.grad(expected.sum(), (q, k, v))
    out = mk.attention_varlen(q, k, v, cu, cu, is_causal=True, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert_close_abs("out", out, expected, 2e-6)
    for name, g, e in zip(("dq", "dk", "dv"), grads, eg):
        assert_close_abs(name, g, e, 2e-6)


# ----------------------------------------------------------------------------------- NaN / Inf
def _nan_rows(out):
    """(rows with a NaN in head 0, rows with a NaN in head 1 column 2) of a packed output."""
    return (torch.isnan(out[:, 0]).any(-1).nonzero().flatten().tolist(),
            torch.isnan(out[:, 1, 2]).nonzero().flatten().tolist())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
def test_non_finite_stays_in_its_sequence(backend, bad, causal):
    """A non-finite key in sequence 1 (head 0) and value (head 1, column 2) in sequence 2, each
    the last row of its sequence (causally visible to that row only): no other sequence changes;
    with NaN, the NaN pattern is the per-sequence SDPA math pattern (math adds the causal mask as
    -inf, NaN + -inf = NaN, and multiplies masked probabilities by V: 0·NaN = NaN)."""
    q, k, v = _qkv()
    k2, v2 = k.clone(), v.clone()
    k2[11, 0, 3] = bad
    v2[19, 1, 2] = bad
    clean = mk.attention_varlen(q, k, v, _cu(GOOD), _cu(GOOD), is_causal=causal, backend="reference")
    out = mk.attention_varlen(q, k2, v2, _cu(GOOD), _cu(GOOD), is_causal=causal, backend=backend)
    assert torch.equal(out[0:5], clean[0:5]) or (out[0:5] - clean[0:5]).abs().max() < 1e-6, \
        "sequence 0 changed by a non-finite value in another sequence"
    assert torch.isfinite(out[0:5]).all()
    assert torch.isfinite(out[5:12, 1]).all() and torch.isfinite(out[12:20, 0]).all()
    if bad != bad:  # NaN: exactly where per-sequence SDPA (math) has it
        assert _nan_rows(out) == (list(range(5, 12)), list(range(12, 20)))


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
def test_nan_query_row_stays_in_its_row(backend):
    q, k, v = _qkv()
    q[9, 1, 0] = float("nan")
    out = mk.attention_varlen(q, k, v, _cu(GOOD), _cu(GOOD), backend=backend)
    bad = torch.isnan(out).any(-1).nonzero().tolist()
    assert bad == [[9, 1]], bad


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_rejected(scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        mk.attention_varlen(q, k, v, _cu(GOOD), _cu(GOOD), scale=scale)
    with pytest.raises(ValueError, match="scale: expected a finite float"):
        mk.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale=scale)


# --------------------------------------------------------------------- Dv != D, empty tensors
@pytest.mark.parametrize("dv", [8, 24, 40])
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_varlen_value_head_dim_differs(backend, dv):
    lens = [5, 0, 9, 6]
    cu = _cu([0, 5, 5, 14, 20])
    q, k = _r3(20, 4, 16), _r3(20, 2, 16)
    v = _r3(20, 2, dv)
    rot = None
    if dv < 16:  # rotary applies to q/k; Dv < D keeps them unpadded
        f = torch.randn(20, 8, device=DEVICE)
        rot = (f.cos(), f.sin())
    kw = dict(is_causal=True, enable_gqa=True, rotary=rot)
    assert sum(lens) == 20
    out = mk.attention_varlen(q, k, v, cu, cu, backend=backend, **kw)
    assert out.shape == (20, 4, dv)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rot64 = None if rot is None else tuple(t.double() for t in rot)
    ref = mk.attention_varlen(q64, k64, v64, cu, cu, backend="reference", **{**kw, "rotary": rot64})
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    grads64 = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    assert_close_abs("out", out, ref, 2e-5)
    for name, g, e in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_abs(name, g, e, 2e-5 * max(1.0, float(e.abs().max())))


def _r3(*shape):
    return torch.randn(*shape, device=DEVICE, requires_grad=True)


EMPTY = {  # (total_q, Hq, total_k, Hkv, D, Dv, cu_q, cu_k)
    "no-rows": (0, 2, 0, 2, 16, 16, [0, 0], [0, 0]),
    "no-keys": (7, 2, 0, 2, 16, 16, [0, 3, 7], [0, 0, 0]),
    "no-queries": (0, 2, 6, 2, 16, 16, [0, 0, 0], [0, 2, 6]),
    "no-heads": (7, 0, 7, 0, 16, 16, [0, 3, 7], [0, 3, 7]),
    "Dv=0": (7, 2, 7, 2, 16, 0, [0, 3, 7], [0, 3, 7]),
    "no-sequences": (0, 2, 0, 2, 16, 16, [0], [0]),
}


@pytest.mark.parametrize("case", list(EMPTY))
@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
def test_varlen_empty_runs_with_zero_gradients(backend, case):
    tq, hq, tk, hkv, d, dv, cq, ck = EMPTY[case]
    q, k, v = _r3(tq, hq, d), _r3(tk, hkv, d), _r3(tk, hkv, dv)
    with poisoned():
        out = mk.attention_varlen(q, k, v, _cu(cq), _cu(ck), backend=backend)
    assert out.shape == (tq, hq, dv)
    assert torch.equal(out, torch.zeros_like(out))
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for name, g, t in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert g is not None, f"{name}: None (expected zeros like the other routes)"
        assert torch.equal(g, torch.zeros_like(t)), name


def test_head_dim_zero_rejected():
    q = torch.randn(5, 2, 0)
    with pytest.raises(ValueError, match="head dim 0"):
        mk.attention_varlen(q, q, torch.randn(5, 2, 4), _cu([0, 5]), _cu([0, 5]))


# ----------------------------------------------------------------- many (mostly empty) sequences
@pytest.mark.parametrize("hint", [False, True], ids=["scan-map", "hint"])
def test_many_sequences_use_the_tile_map(hint):
    """More than 256 sequences (the in-kernel scan's chunk) and no hint: the launchers map
    programs to sequences with device ops (linear in n, not quadratic); results as the reference."""
    g = torch.Generator().manual_seed(5)
    n = 300
    lens = torch.zeros(n, dtype=torch.int64)
    lens[torch.randperm(n, generator=g)[:9]] = torch.randint(1, 40, (9,), generator=g)
    cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32).to(DEVICE)
    total = int(lens.sum())
    q, k, v = _r3(total, 1, 16), _r3(total, 1, 16), _r3(total, 1, 16)
    hint_kw = dict(max_seqlen_q=int(lens.max()), max_seqlen_k=int(lens.max())) if hint else {}
    with poisoned():
        out = mk.attention_varlen(q, k, v, cu, cu, is_causal=True, backend="triton", **hint_kw)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = mk.attention_varlen(q, k, v, cu, cu, is_causal=True, backend="reference")
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert_close_abs("out", out, ref, 2e-6)
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_abs(name, a, e, 4e-6)
