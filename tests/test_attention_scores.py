"""``mmkernels.attention_scores``: softmax column sums over selected query rows, against float64
``softmax(QKᵀ·scale + mask)`` summed over the same rows — every ``query_index`` kind, bool / float
/ broadcast masks, causal, GQA, odd lengths, head dims 72 / 88, with and without the forward's
statistics (both public ``lse`` forms), outputs NaN-poisoned before launch.  On CPU the Triton
kernels run in the interpreter (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, assert_close_rule, poisoned

import mmkernels as mk
from mmkernels import dispatch
from mmkernels.kernels import attention_scores as kernels
from mmkernels.ops.attention_scores import query_rows
from mmkernels.reference.attention import attention_probs

# (B, Hq, Hkv, Lq, Lk, D, mask kind, causal): odd lengths, GQA, Lq != Lk both ways, d 72 / 88 / 64
CASES = {
    "gqa-boolmask-d72": (2, 4, 2, 17, 113, 72, "bool", False),
    "causal-d88": (1, 2, 2, 33, 33, 88, None, True),
    "lq1-padmask-d64": (2, 2, 2, 1, 257, 64, "pad", False),
    "causal-2dfloat-lq>lk-d72": (1, 3, 3, 113, 17, 72, "float2d", True),
}
INDEX_KINDS = ["all", "last", "cls", "slice", "tensor"]


def _mask(kind, b, lq, lk, dtype):
    if kind is None:
        return None
    if kind == "bool":  # (B, 1, Lq, Lk), every row keeps key 0 except one fully masked row
        m = torch.rand(b, 1, lq, lk, device=DEVICE) > 0.4
        m[..., 0] = True
        m[:, :, lq // 2, :] = False
        return m
    if kind == "pad":  # HF-style additive (B, 1, 1, Lk) padding mask with finfo.min and -inf
        m = torch.zeros(b, 1, 1, lk, device=DEVICE, dtype=dtype)
        m[0, ..., :5] = torch.finfo(dtype).min
        m[1, ..., -7:] = float("-inf")
        return m
    if kind == "float2d":  # (Lq, Lk) additive bias, broadcast over batch and heads
        return torch.randn(lq, lk, device=DEVICE, dtype=dtype)
    raise AssertionError(kind)


def _index(kind, b, lq):
    if kind == "all":
        return None
    if kind == "last":
        return -1
    if kind == "cls":
        return 0
    if kind == "slice":
        return slice(1, None, 3) if lq > 1 else slice(0, 1)
    g = torch.Generator().manual_seed(lq)
    idx = torch.randint(-lq, lq, (b, max(1, lq // 4)), generator=g)
    idx[:, 0] = idx[:, -1]  # a row listed twice counts twice
    return idx.to(DEVICE)


def _expected(q, k, mask, causal, gqa, qi, reduce_heads="mean", dtype=torch.float64):
    """Column sums of the full softmax in ``dtype`` (float64: ground truth)."""
    b, h, lq, _ = q.shape
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    p = attention_probs(q.to(dtype), k.to(dtype), m, causal, None, gqa)
    rows = query_rows(qi, b, lq, q.device)
    s = torch.gather(p, 2, rows[:, None, :, None].expand(b, h, rows.shape[1], p.shape[-1])).sum(2)
    return {"mean": s.mean(1), "sum": s.sum(1), None: s}[reduce_heads]


def _inputs(case, dtype=torch.float32):
    b, h, hkv, lq, lk, d, mkind, causal = CASES[case]
    q = torch.randn(b, h, lq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hkv, lk, d, device=DEVICE, dtype=dtype)
    return q, k, _mask(mkind, b, lq, lk, dtype), causal, hkv != h


@pytest.mark.parametrize("kind", INDEX_KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_scores_match_float64(case, kind):
    q, k, mask, causal, gqa = _inputs(case)
    qi = _index(kind, q.shape[0], q.shape[2])
    with poisoned(), mk.use_backend("triton"):
        got = mk.attention_scores(q, k, query_index=qi, attn_mask=mask, is_causal=causal, enable_gqa=gqa,
                                  reduce_heads=None)
    assert got.dtype == torch.float32 and got.shape == (q.shape[0], q.shape[1], k.shape[2])
    exp64 = _expected(q, k, mask, causal, gqa, qi, None)
    assert_close_rule(f"{case}/{kind}", got, exp64, _expected(q, k, mask, causal, gqa, qi, None, torch.float32))


@pytest.mark.parametrize("case", ["gqa-boolmask-d72", "causal-d88", "lq1-padmask-d64"])
def test_scores_from_forward_statistics(case, monkeypatch):
    """Both lse forms give the same scores without the statistics pass (which must not run)."""
    q, k, mask, causal, gqa = _inputs(case)
    v = torch.randn_like(k)
    scale = 1 / math.sqrt(q.shape[-1])
    _, stats2 = torch.ops.mmkernels.attention_fwd(q, k, v, mask, None, 0.0, causal, scale)
    # natural-log LSE = (max + log2 sum)·ln 2; +inf marks a row with no visible key
    nat = torch.where(torch.isinf(stats2[:, :, 0]), stats2[:, :, 0],
                      (stats2[:, :, 0] + stats2[:, :, 1]) * math.log(2))
    ran = []
    monkeypatch.setattr(kernels, "_scores_stats", _Spy(kernels._scores_stats, ran))
    qi = _index("tensor", q.shape[0], q.shape[2])
    exp64 = _expected(q, k, mask, causal, gqa, qi)
    exp32 = _expected(q, k, mask, causal, gqa, qi, dtype=torch.float32)
    for name, lse in (("two-part", stats2), ("natural", nat)):
        with poisoned(), mk.use_backend("triton"):
            got = mk.attention_scores(q, k, lse, query_index=qi, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        assert_close_rule(f"{case}/{name}", got, exp64, exp32)
    assert ran == [], "the statistics kernel ran although lse was given"


class _Spy:
    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.fn[grid]


def test_attention_with_scores_reuses_statistics(monkeypatch):
    q, k, mask, causal, gqa = _inputs("gqa-boolmask-d72")
    v = torch.randn_like(k)
    ran = []
    monkeypatch.setattr(kernels, "_scores_stats", _Spy(kernels._scores_stats, ran))
    with poisoned(), mk.use_backend("triton"):
        out, scores = mk.attention(q, k, v, mask, enable_gqa=gqa, return_scores=dict(query_index=-1,
                                                                                       reduce_heads="sum"))
        out_ref = mk.attention(q, k, v, mask, enable_gqa=gqa)
    assert ran == []
    assert torch.equal(out, out_ref)
    assert_close_rule("scores", scores, _expected(q, k, mask, causal, gqa, -1, "sum"),
                      _expected(q, k, mask, causal, gqa, -1, "sum", torch.float32))
    # other backends: the same pair, computed one after the other
    out_s, scores_s = mk.attention(q, k, v, mask, enable_gqa=gqa, backend="sdpa", return_scores=dict(query_index=-1))
    assert_close_abs("sdpa out", out_s, out_ref, 1e-5)
    assert_close_abs("sdpa scores", scores_s, scores / q.shape[1], 1e-6)
    with pytest.raises(ValueError, match="return_scores"):
        mk.attention(q, k, v, enable_gqa=gqa, return_scores=dict(rows=-1))


def test_fully_masked_rows_contribute_zero():
    q, k = torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 21, 16, device=DEVICE)
    mask = torch.ones(1, 1, 9, 21, dtype=torch.bool, device=DEVICE)
    mask[..., 4, :] = False
    with poisoned(), mk.use_backend("triton"):
        dead = mk.attention_scores(q, k, query_index=4, attn_mask=mask, reduce_heads=None)
        alive = mk.attention_scores(q, k, query_index=torch.tensor([[3, 4]], device=DEVICE), attn_mask=mask)
    assert torch.equal(dead, torch.zeros_like(dead))
    # one live row: its probabilities sum to 1, the dead row adds nothing
    assert_close_abs("row sum", alive.sum(-1), torch.ones(1, device=DEVICE), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    q, k, mask, causal, gqa = _inputs("gqa-boolmask-d72", dtype)
    with poisoned(), mk.use_backend("triton"):
        got = mk.attention_scores(q, k, query_index=None, attn_mask=mask, enable_gqa=gqa)
    assert got.dtype == torch.float32
    assert_close_rule(str(dtype), got, _expected(q, k, mask, causal, gqa, None),
                      _expected(q, k, mask, causal, gqa, None, dtype=dtype))


def test_reduce_heads_and_no_grad():
    q = torch.randn(2, 3, 5, 8, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 3, 11, 8, device=DEVICE, requires_grad=True)
    with mk.use_backend("triton"):
        per_head = mk.attention_scores(q, k, reduce_heads=None)
        mean = mk.attention_scores(q, k)
        total = mk.attention_scores(q, k, reduce_heads="sum")
    assert per_head.shape == (2, 3, 11) and mean.shape == total.shape == (2, 11)
    assert not per_head.requires_grad
    assert_close_abs("mean", mean, per_head.mean(1), 1e-6)
    assert_close_abs("sum", total, per_head.sum(1), 1e-6)
    assert_close_abs("mass", total.sum(-1), torch.full((2,), 15.0, device=DEVICE), 1e-4)  # 3 heads × 5 rows


def test_auto_mode_on_cpu_without_interpreter(monkeypatch):
    """Plain CPU (no TRITON_INTERPRET): auto mode takes the row-chunked reference, float64 works."""
    if DEVICE != "cpu":
        pytest.skip("CPU routing")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, mask, causal, gqa = _inputs("causal-2dfloat-lq>lk-d72", torch.float64)
    chosen = dispatch.select("attention_scores", dict(query=q, key=k, rows=None, stats=None, attn_mask=mask,
                                                      is_causal=causal, scale=0.1))
    assert chosen.name == "reference"
    got = mk.attention_scores(q, k, query_index=slice(0, None, 2), attn_mask=mask, is_causal=causal)
    assert got.dtype == torch.float64
    assert_close_abs("reference", got, _expected(q, k, mask, causal, gqa, slice(0, None, 2)), 1e-12)


def test_bad_input_raises_value_error():
    q, k = torch.randn(2, 4, 7, 16, device=DEVICE), torch.randn(2, 2, 9, 16, device=DEVICE)
    bad = [
        (dict(query_index=7), "query_index: 7 is out of range"),
        (dict(query_index=-8), "query_index"),
        (dict(query_index=torch.tensor([[0, 7], [1, 2]])), r"values must lie in \[-7, 7\)"),
        (dict(query_index=torch.zeros(3, 2, dtype=torch.long)), "shape"),
        (dict(query_index=torch.zeros(2, 1)), "integer tensor"),
        (dict(query_index=slice(5, 2)), "selects no rows"),
        (dict(query_index=1.5), "query_index"),
        (dict(reduce_heads="max"), "reduce_heads"),
        (dict(attn_mask=torch.ones(3, 1, 7, 9, dtype=torch.bool)), "attn_mask"),
        (dict(lse=torch.zeros(2, 4, 6)), "lse"),
    ]
    for kwargs, msg in bad:
        kwargs = dict(kwargs)
        lse = kwargs.pop("lse", None)
        if isinstance(kwargs.get("query_index"), torch.Tensor):
            kwargs["query_index"] = kwargs["query_index"].to(DEVICE)
        with pytest.raises(ValueError, match=msg):
            mk.attention_scores(q, k, lse, enable_gqa=True, **kwargs)
    with pytest.raises(ValueError, match="enable_gqa"):
        mk.attention_scores(q, k)


def test_opcheck_strided_views():
    q = torch.randn(1, 7, 2, 72, device=DEVICE).transpose(1, 2)  # (B, H, L, D) view of (B, L, H, D)
    k = torch.randn(1, 19, 2, 72, device=DEVICE).transpose(1, 2)
    rows = torch.tensor([[6, 0, 3]], device=DEVICE)
    mask = torch.rand(1, 1, 1, 19, device=DEVICE) > 0.3
    op = torch.ops.mmkernels.attention_scores.default
    torch.library.opcheck(op, (q, k, rows, None, mask, False, 0.2))
    torch.library.opcheck(op, (q, k, torch.arange(7, device=DEVICE).expand(1, 7), None, None, True, 0.2))
    stats = torch.zeros(1, 2, 2, 3, device=DEVICE)
    torch.library.opcheck(op, (q, k, rows, stats, None, False, 0.2))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    # HF's layout: (B, L, H, D) projections viewed as (B, H, L, D)
    q = torch.randn(2, 17, 2, 24, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 33, 2, 24, device=DEVICE).transpose(1, 2)
    idx = torch.tensor([[16, 0], [3, -1]], device=DEVICE)

    def f(q, k, idx):
        with mk.use_backend("triton"):
            return mk.attention_scores(q * 2, k, query_index=-1, is_causal=True) + mk.attention_scores(
                q, k, query_index=idx)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    assert_close_abs("compiled", compiled(q, k, idx), f(q, k, idx), 1e-6)
