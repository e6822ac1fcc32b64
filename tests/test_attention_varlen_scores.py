"""mk.attention_varlen(..., return_scores=...): key importance accumulated by the packed forward.

Scores against a float64 per-sequence torch reference (softmax probabilities summed over the
selected rows of each sequence), query_index variants, reduce_heads mean / sum / None, GQA,
causal (bottom-right), rotary, head dims 72 / 80 / 88, the padding tail, poisoned outputs and NaN
inputs, every backend, gradients of ``out``, opcheck and torch.compile(fullgraph=True).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from helpers import poisoned

import mmkernels as mk
from mmkernels.ops.attention_varlen import score_row_weights
from mmkernels.reference.attention_varlen import apply_rotary

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _rotary(total, d):
    freqs = torch.randn(total, d // 2, device=DEVICE) * 3
    freqs = torch.cat((freqs, freqs), -1)
    return freqs.cos(), freqs.sin()


def _inputs(lengths, hq, hkv, d, dtype=torch.float32, tail=0):
    total = sum(lengths) + tail
    q = torch.randn(total, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(total, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(total, hkv, d, device=DEVICE, dtype=dtype)
    return q, k, v, _cu(lengths)


def reference_scores(q, k, cu, query_index=None, reduce_heads="mean", is_causal=False, scale=None, rotary=None):
    """float64: per sequence, softmax(Q Kᵀ·scale) of its own keys, rows ``query_index`` (local,
    negatives from the end; None = every row) summed; keys of no sequence get 0."""
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    q, k = q.double(), k.double()
    hq = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros(hq, k.shape[0], dtype=torch.float64, device=q.device)
    c = cu.tolist()
    for s in range(len(c) - 1):
        qs = q[c[s]:c[s + 1]].transpose(0, 1)
        ks = k[c[s]:c[s + 1]].transpose(0, 1).repeat_interleave(hq // k.shape[1], 0)
        n = qs.shape[1]
        if n == 0:
            continue
        logits = qs @ ks.transpose(1, 2) * scale
        if is_causal:
            logits = logits.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), -math.inf)
        p = torch.softmax(logits, -1)
        if query_index is None:
            rows = list(range(n))
        else:
            idx = [query_index] if isinstance(query_index, int) else list(query_index)
            rows = [i % n for i in idx if -n <= i < n]
        out[:, c[s]:c[s + 1]] = p[:, rows].sum(1)
    if reduce_heads == "mean":
        return out.mean(0)
    if reduce_heads == "sum":
        return out.sum(0)
    return out


CASES = [
    # (lengths, hq, hkv, d, causal, rotary, query_index, reduce_heads, tail)
    ([37, 0, 70, 5], 4, 4, 80, False, True, None, "mean", 0),           # Qwen2-VL style: all rows, mean
    ([33, 1, 64], 4, 2, 72, True, False, 0, None, 3),                   # GQA, causal, first row, tail
    ([20, 45, 9], 2, 1, 88, False, False, [0, -1, 0], "sum", 5),        # duplicates count twice, tail
    ([65, 3], 3, 3, 80, True, True, -1, "mean", 0),                     # last row (FastV-like), causal
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[3]}-h{c[1]}/{c[2]}-{'causal' if c[4] else 'full'}"
                         f"{'-rot' if c[5] else ''}-{c[6]}-{c[7]}-tail{c[8]}")
def test_scores_match_float64_reference(case):
    lengths, hq, hkv, d, causal, rot, qi, red, tail = case
    q, k, v, cu = _inputs(lengths, hq, hkv, d, tail=tail)
    rotary = _rotary(q.shape[0], d) if rot else None
    with poisoned(), mk.use_backend("triton"):
        out, scores = mk.attention_varlen(q, k, v, cu, cu, is_causal=causal, enable_gqa=hq != hkv, rotary=rotary,
                                          return_scores=dict(query_index=qi, reduce_heads=red))
        plain = mk.attention_varlen(q, k, v, cu, cu, is_causal=causal, enable_gqa=hq != hkv, rotary=rotary)
    expected = reference_scores(q, k, cu, qi, red, causal, rotary=rotary)
    assert scores.dtype == torch.float32 and scores.shape == expected.shape and not scores.requires_grad
    err = (scores.double() - expected).abs().max().item()
    assert err < 2e-5 * max(1.0, expected.abs().max().item()), err
    assert torch.equal(out, plain)  # the forward's output is the plain kernel's, bit for bit
    if tail:
        assert torch.all(scores[..., -tail:] == 0) and torch.all(out[-tail:] == 0)


def test_fp16_and_every_backend_agree():
    lengths = [29, 0, 40]
    q, k, v, cu = _inputs(lengths, 4, 2, 72, torch.float16, tail=2)
    rotary = _rotary(q.shape[0], 72)
    kw = dict(is_causal=True, enable_gqa=True, rotary=rotary)
    expected = reference_scores(q, k, cu, [0, -1], None, True, rotary=rotary)
    results = {}
    for backend in ("triton", "sdpa", "reference"):
        out, scores = mk.attention_varlen(q, k, v, cu, cu, backend=backend,
                                          return_scores=dict(query_index=[0, -1], reduce_heads=None), **kw)
        err = (scores.double() - expected).abs().max().item()
        assert err < 2e-3, (backend, err)  # fp16 rotated q/k rounded differently from the fp64 rotation
        results[backend] = out, scores
    for backend in ("sdpa", "reference"):
        assert (results[backend][1] - results["triton"][1]).abs().max() < 1e-5
        assert (results[backend][0].float() - results["triton"][0].float()).abs().max() < 2e-3
    # float64 runs on sdpa / reference and returns float64 scores
    q64, k64, v64 = (t.double() for t in (q, k, v))
    rot64 = tuple(t.double() for t in rotary)
    for backend in (None, "reference"):
        _, s64 = mk.attention_varlen(q64, k64, v64, cu, cu, is_causal=True, enable_gqa=True, rotary=rot64,
                                     backend=backend, return_scores=dict(query_index=[0, -1], reduce_heads=None))
        assert s64.dtype == torch.float64
        assert (s64 - reference_scores(q64, k64, cu, [0, -1], None, True, rotary=rot64)).abs().max() < 1e-12


def test_query_index_forms_and_out_of_range_rows():
    lengths = [3, 10, 0, 6]
    q, k, v, cu = _inputs(lengths, 2, 2, 80)
    forms = [(0, [0]), ([0], [0]), (torch.tensor([0, 5]), [0, 5]), ((-1, 4), [-1, 4])]
    for qi, as_list in forms:
        for backend in ("triton", "sdpa"):
            _, s = mk.attention_varlen(q, k, v, cu, cu, backend=backend,
                                       return_scores=dict(query_index=qi, reduce_heads=None))
            # row 4 / 5 does not exist in the 3-row sequence: selects nothing there
            assert (s.double() - reference_scores(q, k, cu, as_list, None)).abs().max() < 2e-6
    # defaults: every row, heads averaged; every row sums to one per selected row
    _, s = mk.attention_varlen(q, k, v, cu, cu, return_scores={})
    assert s.shape == (sum(lengths),)
    assert abs(s.sum().item() - sum(lengths)) < 1e-4


def test_dropout_scores_are_pre_dropout_and_out_has_gradients():
    lengths = [17, 30]
    q, k, v, cu = _inputs(lengths, 2, 2, 64)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with mk.use_backend("triton"):
        torch.manual_seed(3)
        out, scores = mk.attention_varlen(q, k, v, cu, cu, dropout_p=0.25,
                                          return_scores=dict(query_index=0, reduce_heads="mean"))
        torch.manual_seed(3)
        plain = mk.attention_varlen(q, k, v, cu, cu, dropout_p=0.25)
    assert not scores.requires_grad and out.requires_grad
    assert torch.equal(out, plain)  # same Philox stream
    assert (scores.double() - reference_scores(q.detach(), k.detach(), cu, 0, "mean")).abs().max() < 2e-6
    do = torch.randn_like(out)
    g = torch.autograd.grad(out, (q, k, v), do)
    g_plain = torch.autograd.grad(plain, (q, k, v), do)
    for a, b in zip(g, g_plain):
        assert torch.equal(a, b)


def test_nan_stays_in_its_sequence_and_empty_inputs():
    lengths = [12, 20, 9]
    q, k, v, cu = _inputs(lengths, 2, 2, 80)
    k[15, 1, 3] = float("nan")  # sequence 1, head 1
    expected = reference_scores(q, k, cu, None, None)
    for backend in ("triton", "sdpa", "reference"):
        _, s = mk.attention_varlen(q, k, v, cu, cu, backend=backend, return_scores=dict(reduce_heads=None))
        assert torch.isnan(s[1, 12:32]).all(), backend
        finite = torch.ones_like(s, dtype=torch.bool)
        finite[1, 12:32] = False
        assert (s[finite].double() - expected[finite]).abs().max() < 2e-6, backend
    # no keys at all: zero scores of shape (total_k,) = (0,)
    q0, k0, v0 = q[:0], k[:0], v[:0]
    cu0 = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out, s = mk.attention_varlen(q0, k0, v0, cu0, cu0, return_scores=dict(reduce_heads=None))
    assert out.shape == (0, 2, 80) and s.shape == (2, 0)


def test_bad_return_scores_name_the_argument():
    q, k, v, cu = _inputs([4, 4], 2, 2, 16)
    bad = [dict(rows=0), dict(reduce_heads="max"), dict(query_index=1.5), dict(query_index=[]),
           dict(query_index=torch.tensor([0.0])), dict(query_index=True), dict(query_index=torch.zeros(1, 1).long()),
           "mean"]
    for rs in bad:
        with pytest.raises(ValueError, match="return_scores"):
            mk.attention_varlen(q, k, v, cu, cu, return_scores=rs)


def test_opcheck_scores_op():
    lengths = [9, 0, 3]
    q, k, v, cu = _inputs(lengths, 2, 1, 72, tail=2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    op = torch.ops.mmkernels.attention_varlen_fwd_scores.default
    w = score_row_weights(torch.tensor([0, -1]), cu, q.shape[0])
    cos, sin = _rotary(q.shape[0], 72)
    torch.library.opcheck(op, (q, k, v, cu, cu, cos, sin, None, 9, 9, 0.0, True, 0.3, w, "none"))


def test_compile_fullgraph():
    compiler = "aot_eager"  # inductor: tests/test_attention_varlen.py compiles the same custom-op route
    lengths = [17, 1, 0, 30]
    q, k, v, cu = _inputs(lengths, 2, 2, 80)
    q.requires_grad_()
    rot = _rotary(q.shape[0], 80)

    def f(q, k, v, cu, cos, sin):
        with mk.use_backend("triton"):
            return mk.attention_varlen(q, k, v, cu, cu, rotary=(cos, sin),
                                       return_scores=dict(query_index=0, reduce_heads="mean"))

    torch._dynamo.reset()
    out, scores = torch.compile(f, fullgraph=True, backend=compiler)(q, k, v, cu, *rot)
    (grad,) = torch.autograd.grad(out.sum(), (q,))
    out_e, scores_e = f(q, k, v, cu, *rot)
    (grad_e,) = torch.autograd.grad(out_e.sum(), (q,))
    assert (out - out_e).abs().max() < 1e-6 and (scores - scores_e).abs().max() < 1e-6
    assert (grad - grad_e).abs().max() < 1e-6


_COMPILE_CHILD = """
import itertools, json, sys
import torch
from mmkernels.kernels._launch import capture_launches
from mmkernels.kernels import attention_varlen as V
from mmkernels.tools import compile_report as C
lengths = (1024, 3600, 1680)  # the Qwen2-VL packing of mmkernels inspect (qwen2-vl-packed)
total, H = sum(lengths), 16
cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
rows = []
for d, mode in ((72, "all"), (80, "all"), (88, "rows")):
    q, k, v = torch.empty(total, 3, H, d, dtype=torch.bfloat16).unbind(1)
    with capture_launches(90) as launches:
        V.varlen_forward(q, k, v, cu, cu, None, None, None, 3600, 3600, 0.0, False, d ** -0.5,
                         scores=(None if mode == "all" else torch.zeros(total), "mean"))
    launch = next(x for x in launches if x.fn is V._varlen_fwd)
    cfg = launch.candidates[0]
    kw = dict(launch.kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    compiled, _, _ = C._compile(launch.fn, launch.args, kw, 90)
    regs, spill = C._resources(compiled.asm["cubin"])
    rows.append(dict(d=d, mode=mode, spill=spill, **C._ptx_stats(compiled.asm["ptx"])))
json.dump(rows, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_sm90_scores_forward_compiles_pipelined_without_spills(tmp_path):
    """The SCORES variant's default configuration at the Qwen packing, d = 72 / 80 / 88, for sm_90
    (no GPU needed): no spills, products on wgmma, K/V pipelined with 16-byte cp.async."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import triton_has_cuda_backend

    if not triton_has_cuda_backend():
        pytest.skip("triton has no NVIDIA backend on this platform")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "-c", _COMPILE_CHILD, str(out)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    for r in json.loads(out.read_text()):
        assert r["spill"] == 0 and r["wgmma"] > 0 and r["mma_sync"] == 0 and r["cp_async_16"] > 0, r
