"""mmkernels.attention_varlen: packed attention on the Triton path (interpreter on CPU).

Every numeric case: fresh random packings with odd and empty lengths, outputs NaN-poisoned
before launch, forward and all gradients against a float64 per-sequence reference (low precision
by the 2x-PyTorch rule).  Then: dropout replay, the no-host-sync contract (compile with no graph
break, .item/.tolist forbidden), opcheck, bad input, and the HF Qwen2-VL / Qwen2.5-VL patch.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, assert_close_rule, poisoned

import mmkernels as mk
from mmkernels import dispatch
from mmkernels.reference.attention_varlen import attention_varlen as ref_varlen

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _rotary(total, d, half=False):
    freqs = torch.randn(total, d // 2, device=DEVICE) * 3
    if not half:
        freqs = torch.cat((freqs, freqs), -1)
    return freqs.cos(), freqs.sin()


def _packed(lq, lk, hq, hkv, d, dtype, transposed=False):
    def make(total, h):
        if transposed:  # (H, total, D) storage viewed as (total, H, D)
            return torch.randn(h, total, d, device=DEVICE, dtype=dtype).transpose(0, 1).requires_grad_()
        return torch.randn(total, h, d, device=DEVICE, dtype=dtype, requires_grad=True)

    return make(sum(lq), hq), make(sum(lk), hkv), make(sum(lk), hkv), _cu(lq), _cu(lk)


def _reference(q, k, v, cu_q, cu_k, do, cast, rotary=None, **kw):
    qc, kc, vc = (x.detach().to(cast).requires_grad_() for x in (q, k, v))
    rot = None if rotary is None else tuple(t.to(torch.float64) if cast == torch.float64 else t for t in rotary)
    out = ref_varlen(qc, kc, vc, cu_q, cu_k, rotary=rot, **kw)
    return out, torch.autograd.grad(out, (qc, kc, vc), do.to(cast))


def check(q, k, v, cu_q, cu_k, *, factor=2.0, **kw):
    """Triton (forced, poisoned) vs float64; returns the max errors (out, dq, dk, dv)."""
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention_varlen(q, k, v, cu_q, cu_k, **kw)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    ref_kw = {key: val for key, val in kw.items() if key not in ("max_seqlen_q", "max_seqlen_k")}
    out64, grads64 = _reference(q, k, v, cu_q, cu_k, do, torch.float64, **ref_kw)
    outlp, gradslp = _reference(q, k, v, cu_q, cu_k, do, q.dtype, **ref_kw)
    assert_close_rule("out", out, out64, outlp, factor)
    errs = [float((out.double() - out64).abs().max())]
    for name, g, g64, glp in zip(("dq", "dk", "dv"), grads, grads64, gradslp):
        assert g.dtype == q.dtype and g.is_contiguous()
        assert_close_rule(name, g, g64, glp, factor)
        errs.append(float((g.double() - g64).abs().max()))
    return errs


# (lengths q, lengths k, Hq, Hkv, D, causal, rotary): lengths 1, 17, 113 and 0; Lq != Lk per sequence
CASES = [
    ([1, 17, 113, 0, 40], [1, 17, 113, 0, 40], 2, 2, 64, False, None),
    ([17, 1, 0, 113], [40, 5, 3, 60], 4, 2, 72, True, None),        # GQA, Lq > Lk and Lq < Lk, causal
    ([113, 0, 17, 1], [17, 9, 113, 0], 2, 1, 88, True, None),       # a sequence with Lq=1, Lk=0
    ([1, 17, 0, 57], [1, 17, 0, 57], 2, 2, 72, False, "half"),
    ([33, 1, 70], [33, 1, 70], 2, 2, 80, True, "full"),            # Qwen2-VL head dim, rotary
    ([17, 0, 50], [30, 2, 50], 1, 1, 128, False, None),
    ([20, 45], [20, 45], 4, 2, 64, True, "full"),
]


def _id(c):
    lq, lk, hq, hkv, d, causal, rot = c
    return f"d{d}-H{hq}x{hkv}-{'-'.join(map(str, lq))}" + ("-causal" if causal else "") + (f"-rot{rot}" if rot else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_fp32(case):
    lq, lk, hq, hkv, d, causal, rot = case
    q, k, v, cu_q, cu_k = _packed(lq, lk, hq, hkv, d, torch.float32)
    rotary = None if rot is None else _rotary(sum(lq), d, half=rot == "half")
    check(q, k, v, cu_q, cu_k, is_causal=causal, enable_gqa=hq != hkv, rotary=rotary)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_rotary_causal(dtype):
    lengths = [1, 17, 0, 113]
    q, k, v, cu_q, cu_k = _packed(lengths, lengths, 2, 2, 88, dtype)
    check(q, k, v, cu_q, cu_k, is_causal=True, rotary=_rotary(sum(lengths), 88))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_interior_and_edge_blocks(causal):
    """Sequences of several key/query blocks whose lengths are not multiples of the tiles
    (interpreter tiles 64x32 forward and dQ, 32x64 dK/dV), Lq < Lk and Lq > Lk per sequence:
    the interior blocks run with no bounds or causal select, the bottom-right causal band and
    each sequence's ragged end with them."""
    lq, lk = [200, 130, 97, 1], [130, 200, 97, 66]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 1, 1, 88, torch.float32)
    check(q, k, v, cu_q, cu_k, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_very_negative_logits_ragged_ends(causal):
    """Every logit below -128 in base 2 (exp2 of its negation overflows fp32) and every
    sequence ending in a ragged key block: the dQ kernel's edge tile must bounds-mask the zero
    padding keys, or P = exp2(-m) = inf turns dS·K into NaN."""
    lq, lk = [70, 45, 33], [45, 77, 33]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 2, 2, 64, torch.float32)
    with torch.no_grad():
        q.copy_(1.0 + 0.1 * q.abs())
        k.copy_(-(1.0 + 0.1 * k.abs()))
    assert float((q[:, 0] @ k[:, 0].T).max()) * 1.5 * math.log2(math.e) < -128
    errs = check(q, k, v, cu_q, cu_k, is_causal=causal, scale=1.5)
    assert all(math.isfinite(e) for e in errs)


@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
def test_nonpositive_scale(scale):
    """The scale is folded into the exp2's FMA (max(s)·scale = max(s·scale) needs scale > 0);
    scales <= 0 take the pre-scaled path (PRESCALE): same results."""
    q, k, v, cu_q, cu_k = _packed([45, 17], [77, 17], 2, 1, 72, torch.float32)
    check(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=True, scale=scale)


@pytest.mark.parametrize("d,hkv,rot", [(33, 1, None), (36, 2, "half")], ids=["d33-gqa", "d36-rotary"])
def test_head_dims_not_multiple_of_8(d, hkv, rot):
    """Any head dim up to 256 runs on Triton, as mk.attention: split into power-of-two chunks
    (33 -> 32+16) zero-padded in registers, loaded without the alignment hint (rows of 33/36
    elements are not 16-byte aligned)."""
    lengths = [17, 70, 1]
    q, k, v, cu_q, cu_k = _packed(lengths, lengths, 2, hkv, d, torch.float32)
    inputs = dict(query=q, key=k, value=v, rotary=None)
    assert dispatch.select("attention_varlen", inputs, None).name == "triton"
    rotary = None if rot is None else _rotary(sum(lengths), d, half=True)
    check(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=hkv != 2, rotary=rotary)


def test_max_seqlen_hint_and_strided_inputs():
    lq, lk = [17, 113, 0, 40], [20, 100, 3, 40]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 2, 2, 64, torch.float32, transposed=True)
    check(q, k, v, cu_q, cu_k, is_causal=True, max_seqlen_q=113, max_seqlen_k=100)
    # windows of equal size (Qwen2.5-VL), 8 sequences and the padding tail: the hint grid
    # (n-1)*cdiv(max, BLOCK) + cdiv(total, BLOCK) (the tail is not bounded by the hint) is the smaller one
    from mmkernels.kernels.attention_varlen import grid_size

    assert grid_size(9, 144, 64, None) == (3 + 9, 0)
    assert grid_size(9, 144, 64, 16) == (8 + 3, 1)
    assert grid_size(2, 200, 64, 200) == (6, 0)  # a hint that does not shrink the grid is not used
    assert grid_size(301, 600, 64, 2) == (300 + 10, 1)
    assert grid_size(301, 600, 64, 64) == (300 + 10, 1)  # > _SCAN sequences: up to 2x the grid, no tile map
    assert grid_size(301, 600, 64, 200) == (10 + 301, 0)


def test_tile_lookup_spans_several_scan_chunks(monkeypatch):
    """More sequences than one vector chunk of the in-kernel lookup (chunk shrunk to 16 here)."""
    from mmkernels.kernels import attention_varlen as kv

    monkeypatch.setattr(kv, "_SCAN", 16)
    lengths = [3, 0, 70, 1] * 10 + [65]
    q, k, v, cu_q, cu_k = _packed(lengths, lengths, 1, 1, 16, torch.float32)
    check(q, k, v, cu_q, cu_k, is_causal=True)


def test_float64_and_sdpa_route_match_reference():
    """Auto mode on float64 takes the block-diagonal SDPA route (no host read)."""
    lq, lk = [1, 17, 0, 30], [5, 17, 4, 0]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 2, 1, 24, torch.float64)
    rot = _rotary(sum(lq), 24)
    with pytest.raises(ValueError, match="rotary"):
        mk.attention_varlen(q, k, v, cu_q, cu_k, enable_gqa=True, rotary=rot)  # total_q != total_k
    chosen = dispatch.select("attention_varlen", dict(query=q, key=k, value=v, rotary=None), None)
    assert chosen.name == "sdpa"
    out = mk.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=True)
    assert_close_abs("sdpa route", out, ref_varlen(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=True), 1e-12)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_auto_uses_triton_under_interpreter():
    q, k, v, cu_q, cu_k = _packed([3], [3], 1, 1, 64, torch.float32)
    inputs = dict(query=q, key=k, value=v, rotary=None)
    assert dispatch.select("attention_varlen", inputs, None).name == "triton"


def test_empty_packings():
    q, k, v, cu_q, cu_k = _packed([0, 5, 0], [0, 0, 0], 2, 2, 64, torch.float32)
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention_varlen(q, k, v, cu_q, cu_k)
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))
    q, k, v, cu_q, cu_k = _packed([0, 0], [0, 0], 2, 2, 64, torch.float32)
    with poisoned(), mk.use_backend("triton"):
        assert mk.attention_varlen(q, k, v, cu_q, cu_k).shape == (0, 2, 64)


# ----------------------------------------------------------------------------- dropout
def _dropout_mask(p, lq, lk, h, d=64, causal=False):
    """Run with one-hot values (value row j = e_j): the output is dropout(P)/(1-p), so the
    kernel's keep-mask is readable as (out != 0) on each sequence's diagonal block."""
    q, k, _, cu_q, cu_k = _packed(lq, lk, h, h, d, torch.float32)
    v = torch.zeros(sum(lk), h, d, device=DEVICE)
    for s in range(len(lk)):
        for j in range(lk[s]):
            v[int(cu_k[s]) + j, :, j] = 1.0
    with mk.use_backend("triton"):
        out = mk.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=p, is_causal=causal)
    keep = torch.zeros(h, sum(lq), sum(lk), dtype=torch.bool, device=DEVICE)
    for s in range(len(lq)):
        blk = out[int(cu_q[s]):int(cu_q[s + 1]), :, : lk[s]].transpose(0, 1) != 0
        keep[:, int(cu_q[s]):int(cu_q[s + 1]), int(cu_k[s]):int(cu_k[s + 1])] = blk
    return out, keep


def test_dropout_reproducible_and_backward_replays_the_mask():
    p, lq, lk, h = 0.3, [17, 1, 40], [30, 20, 40], 2
    torch.manual_seed(11)
    out1, keep = _dropout_mask(p, lq, lk, h)
    torch.manual_seed(11)
    out2, _ = _dropout_mask(p, lq, lk, h)
    assert torch.equal(out1, out2), "torch.manual_seed must replay the dropout mask"
    torch.manual_seed(12)
    out3, _ = _dropout_mask(p, lq, lk, h)
    assert not torch.equal(out1, out3)
    visible = sum(a * b for a, b in zip(lq, lk)) * h
    frac = float(keep.sum()) / visible
    assert abs(frac - (1 - p)) < 0.05, frac

    # the same seed with random values: forward and every gradient equal the reference with that mask
    q, k, v, cu_q, cu_k = _packed(lq, lk, h, h, 64, torch.float32)
    torch.manual_seed(11)
    _packed(lq, lk, h, h, 64, torch.float32)  # replay _dropout_mask's draws before the seed draw
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention_varlen(q, k, v, cu_q, cu_k, dropout_p=p)
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64 = ref_varlen(q64, k64, v64, cu_q, cu_k, dropout_p=p, dropout_mask=keep)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), do.double())
    assert_close_abs("dropout out", out, out64, 2e-5)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert_close_abs(f"dropout {name}", g, g64, 2e-5)


# ----------------------------------------------------------------------------- no host sync / compile
def _no_host_reads(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("a device value was read on the host")

    for name in ("item", "tolist", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_no_host_reads(monkeypatch, backend):
    lq = [17, 0, 40]
    q, k, v, cu_q, cu_k = _packed(lq, lq, 2, 2, 64, torch.float32)
    rot = _rotary(sum(lq), 64)
    with mk.use_backend(backend):
        expected = mk.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, rotary=rot, dropout_p=0.0)
        expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
        _no_host_reads(monkeypatch)
        out = mk.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, rotary=rot)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    monkeypatch.undo()
    assert torch.equal(out, expected)
    for g, e in zip(grads, expected_grads):
        assert torch.equal(g, e)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_fwd_bwd(compiler):
    assert torch._dynamo.config.capture_scalar_outputs is False
    lq = [17, 1, 0, 30]
    q, k, v, cu_q, cu_k = _packed(lq, lq, 2, 2, 72, torch.float32)
    rot = _rotary(sum(lq), 72)

    def f(q, k, v, cu_q, cu_k, cos, sin):
        with mk.use_backend("triton"):
            return mk.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, rotary=(cos, sin))

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compiler)
    out = compiled(q, k, v, cu_q, cu_k, *rot)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    expected = f(q, k, v, cu_q, cu_k, *rot)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    assert_close_abs("compiled out", out, expected, 1e-6)
    for a, b in zip(grads, expected_grads):
        assert_close_abs("compiled grad", a, b, 1e-6)


def test_opcheck():
    lq, lk = [9, 0, 3], [5, 3, 9]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 2, 1, 72, torch.float32, transposed=True)
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    fwd, bwd = torch.ops.mmkernels.attention_varlen_fwd.default, torch.ops.mmkernels.attention_varlen_bwd.default
    torch.library.opcheck(fwd, (q, k, v, cu_q, cu_k, None, None, seed, None, None, 0.2, True, 0.3))
    lq = [9, 0, 3]
    q, k, v, cu_q, _ = _packed(lq, lq, 2, 2, 64, torch.float32, transposed=True)
    cos, sin = _rotary(sum(lq), 64, half=True)
    args = (q, k, v, cu_q, cu_q, cos, sin, None, 9, 9, 0.0, False, 0.125)
    torch.library.opcheck(fwd, args)
    out, lse = (t.detach() for t in fwd(*args))
    do = torch.randn(2, sum(lq), 64, device=DEVICE).transpose(0, 1)  # a transposed grad_out
    q, k, v = (t.detach() for t in (q, k, v))
    torch.library.opcheck(bwd, (do, q, k, v, out, lse, cu_q, cu_q, cos, sin, None, 9, 9, 0.0, False, 0.125))


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    q, k, v, cu, _ = _packed([3, 4], [3, 4], 2, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q.*int32"):
        mk.attention_varlen(q, k, v, cu.long(), cu)
    with pytest.raises(ValueError, match="cu_seqlens_k.*non-decreasing"):
        mk.attention_varlen(q, k, v, cu, torch.tensor([0, 5, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q.*last entry"):
        mk.attention_varlen(q, k, v, torch.tensor([0, 3, 8], dtype=torch.int32), cu)
    with pytest.raises(ValueError, match="cu_seqlens_k.*device"):
        mk.attention_varlen(q, k, v, cu, cu.to("meta"))
    with pytest.raises(ValueError, match="cu_seqlens_q.*1-D"):
        mk.attention_varlen(q, k, v, cu[None], cu)
    with pytest.raises(ValueError, match="cu_seqlens_k.*entries"):
        mk.attention_varlen(q, k, v, cu, _cu([3, 4, 0]))
    with pytest.raises(ValueError, match="query.*3-D"):
        mk.attention_varlen(q[None], k, v, cu, cu)
    with pytest.raises(ValueError, match="rotary cos.*shape"):
        mk.attention_varlen(q, k, v, cu, cu, rotary=_rotary(6, 64))
    with pytest.raises(ValueError, match="max_seqlen_q"):
        mk.attention_varlen(q, k, v, cu, cu, max_seqlen_q=-1)
    with pytest.raises(ValueError, match="key.*enable_gqa"):
        mk.attention_varlen(q, k[:, :1], v[:, :1], cu, cu)


# ----------------------------------------------------------------------------- Hugging Face Qwen-VL vision
transformers = pytest.importorskip("transformers")


def _vision_patch_cycle(model, visual, pix, grid, depth):
    """Unpatched vs patched (Triton forced, poisoned): vision output and every parameter
    gradient; exactly one attention_varlen call per vision layer and no other attention op."""
    def run():
        visual.zero_grad()
        out = visual(pix, grid_thw=grid)
        out = out.pooler_output if hasattr(out, "pooler_output") else out
        out = out[0] if isinstance(out, tuple) else out
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run()
    report = mk.patch(model)
    assert any(m == "forward" and "attention_varlen" in what for _, m, what in report.methods), str(report)
    try:
        with poisoned(), mk.use_backend("triton"), mk.dispatch.record() as calls:
            out, grads = run()
    finally:
        mk.unpatch(model)
    assert [c for c in calls if c[0].startswith("attention")] == [("attention_varlen", "triton")] * depth, calls
    assert_close_abs("vision out", out, ref_out, 5e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close_abs(f"grad {name}", grads[name], ref_grads[name], 5e-5)


def _tcls(name):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


# two images (4x4, 2x6 patches) and a 2-frame video (2x4): 16 + 12 + 16 patches
GRID = [[1, 4, 4], [1, 2, 6], [2, 2, 4]]


def test_qwen2_vl_vision_one_varlen_call_per_layer():
    cfg = _tcls("Qwen2VLConfig")(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64,
                         rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])))
    model = _tcls("Qwen2VLForConditionalGeneration")(cfg).to(DEVICE)
    grid = torch.tensor(GRID, device=DEVICE)
    pix = torch.randn(44, 3 * 2 * 2 * 2, device=DEVICE)
    _vision_patch_cycle(model, model.model.visual, pix, grid, depth=2)


def test_qwen2_5_vl_window_and_full_blocks():
    cfg = _tcls("Qwen2_5_VLConfig")(
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=64, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1],
                           out_hidden_size=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64,
                         rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])))
    model = _tcls("Qwen2_5_VLForConditionalGeneration")(cfg).to(DEVICE)
    grid = torch.tensor([[1, 4, 8], [1, 2, 6], [2, 4, 4]], device=DEVICE)  # several windows per image
    pix = torch.randn(32 + 12 + 32, 3 * 2 * 2 * 2, device=DEVICE)
    _vision_patch_cycle(model, model.model.visual, pix, grid, depth=2)


def test_qwen3_vl_vision():
    cfg = _tcls("Qwen3VLConfig")(
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=64, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, head_dim=16,
                         rope_scaling=dict(rope_type="default", mrope_section=[2, 3, 3])))
    model = _tcls("Qwen3VLForConditionalGeneration")(cfg).to(DEVICE)
    grid = torch.tensor(GRID, device=DEVICE)
    pix = torch.randn(44, 3 * 2 * 2 * 2, device=DEVICE)
    _vision_patch_cycle(model, model.model.visual, pix, grid, depth=2)


def test_lm_padding_free_packed_batch():
    """register_hf: a DataCollatorWithFlattening batch (flash-attn boundary kwargs) runs each LM
    layer as one attention_varlen call and equals the sequences run one by one."""
    from transformers import DataCollatorWithFlattening

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()
    seqs = [torch.randint(0, 64, (n,)).tolist() for n in (5, 17, 1, 9)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": s} for s in seqs])
    batch = {key: (val.to(DEVICE) if isinstance(val, torch.Tensor) else val) for key, val in batch.items()
             if key != "labels"}
    with torch.no_grad():
        expected = torch.cat([model(input_ids=torch.tensor([s], device=DEVICE)).logits[0] for s in seqs])
    mk.patch(model)
    try:
        with torch.no_grad(), poisoned(), mk.use_backend("triton"), mk.dispatch.record() as calls:
            got = model(**batch).logits[0]
    finally:
        mk.unpatch(model)
    assert calls == [("attention_varlen", "triton")] * 2, calls
    assert_close_abs("packed logits", got, expected, 2e-5)


# ----------------------------------------------------------------------------- rotary on mk.attention
@pytest.mark.parametrize("cos_shape,dtype,causal", [("L,D", torch.float32, True), ("B,L,D/2", torch.float32, False),
                                                    ("L,D/2", torch.bfloat16, False)],
                         ids=["shared-causal", "per-batch-half", "bf16-shared-half"])
def test_dense_attention_rotary(cos_shape, dtype, causal):
    """mk.attention(..., rotary=(cos, sin)) on (B, H, L, D), GQA, head dim 80 (split 64+16):
    output and gradients vs float64 with the RoPE applied in torch first."""
    from mmkernels.reference.attention import attention as ref_attention
    from mmkernels.reference.rotary import apply_rotary

    b, hq, hkv, length, d = 2, 2, 1, 45, 80
    q = torch.randn(b, hq, length, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, length, d, device=DEVICE, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
    k.requires_grad_()
    v = torch.randn(b, hkv, length, d, device=DEVICE, dtype=dtype, requires_grad=True)
    lead = (b,) if cos_shape.startswith("B") else ()
    freqs = torch.randn(*lead, length, d // 2, device=DEVICE) * 3
    if not cos_shape.endswith("/2"):
        freqs = torch.cat((freqs, freqs), -1)
    cos, sin = freqs.cos(), freqs.sin()
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention(q, k, v, is_causal=causal, enable_gqa=True, rotary=(cos, sin))
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)

    def reference(cast):
        qc, kc, vc = (x.detach().to(cast).requires_grad_() for x in (q, k, v))
        c, s = (t.unsqueeze(-3).to(torch.float64 if cast == torch.float64 else torch.float32) for t in (cos, sin))
        o = ref_attention(apply_rotary(qc, c, s), apply_rotary(kc, c, s), vc, is_causal=causal, enable_gqa=True)
        return o, torch.autograd.grad(o, (qc, kc, vc), do.to(cast))

    out64, grads64 = reference(torch.float64)
    outlp, gradslp = reference(dtype)
    assert_close_rule("out", out, out64, outlp)
    for name, g, g64, glp in zip(("dq", "dk", "dv"), grads, grads64, gradslp):
        assert_close_rule(name, g, g64, glp)
    # the sdpa route applies the same rotation in torch
    with mk.use_backend("sdpa"):
        assert_close_abs("sdpa route", mk.attention(q, k, v, is_causal=causal, enable_gqa=True, rotary=(cos, sin)),
                         out64, 0.05 if dtype == torch.bfloat16 else 1e-5)
    with pytest.raises(ValueError, match="rotary cos"):
        mk.attention(q, k, v, enable_gqa=True, rotary=(cos[..., :7, :], sin[..., :7, :]))


@pytest.mark.gpu
def test_cuda_no_sync_and_graph_capture():
    """On CUDA: no synchronising call (sync debug mode "error") and CUDA-graph capture of the
    forward with the rotary fused; the replay equals the eager result."""
    lq = [17, 1, 0, 300, 64]
    q, k, v, cu_q, cu_k = _packed(lq, lq, 4, 2, 80, torch.bfloat16)
    q, k, v = (t.detach() for t in (q, k, v))
    rot = _rotary(sum(lq), 80)

    def f():
        return mk.attention_varlen(q, k, v, cu_q, cu_k, is_causal=True, enable_gqa=True, rotary=rot)

    expected = f()  # compiles / autotunes outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        f()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        f()
        with torch.cuda.graph(graph, stream=stream):
            out = f()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
