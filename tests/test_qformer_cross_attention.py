"""mmkernels.qformer_cross_attention: fused Triton forward (interpreter on CPU) + backward,
against the float64 reference (F.linear + softmax attention)."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, assert_close_rule, poisoned

import mmkernels as mk
from mmkernels.reference.qformer_cross_attention import qformer_cross_attention as ref_qformer

ops_qformer = importlib.import_module("mmkernels.ops.qformer_cross_attention")  # mk.ops.qformer_cross_attention: the op

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GRAD_NAMES = ("d_hidden", "d_encoder", "d_q_weight", "d_q_bias", "d_k_weight", "d_k_bias", "d_v_weight", "d_v_bias")


def _make(b, bkv, lq, lk, dq, dkv, dtype=torch.float32):
    x = torch.randn(b, lq, dq, device=DEVICE, dtype=dtype)
    enc = torch.randn(bkv, lk, dkv, device=DEVICE, dtype=dtype)
    wq = torch.randn(dq, dq, device=DEVICE, dtype=dtype) / dq**0.5
    wk = torch.randn(dq, dkv, device=DEVICE, dtype=dtype) / dkv**0.5
    wv = torch.randn(dq, dkv, device=DEVICE, dtype=dtype) / dkv**0.5
    bq, bk, bv = (torch.randn(dq, device=DEVICE, dtype=dtype) * 0.1 for _ in range(3))
    return [t.requires_grad_() for t in (x, enc, wq, bq, wk, bk, wv, bv)]


def _grads(out, tensors, do):
    x, enc, wq, bq, wk, bk, wv, bv = tensors
    return torch.autograd.grad(out, (x, enc, wq, bq, wk, bk, wv, bv), do)


def _ref(tensors, heads, cast, do, **kw):
    t = [a.detach().to(cast).requires_grad_() for a in tensors]
    mask = kw.pop("encoder_attention_mask", None)
    if mask is not None and mask.dtype != torch.bool and mask.dim() > 2:
        mask = mask.to(cast)
    out = ref_qformer(*t[:8], heads, encoder_attention_mask=mask, **kw)
    return out, _grads(out, t, do.to(cast))


def check(tensors, heads, *, factor=2.0, **kw):
    with poisoned():
        out = mk.qformer_cross_attention(*tensors, heads, backend="triton", **kw)
        do = torch.randn_like(out)
        grads = _grads(out, tensors, do)
    kw.pop("dropout_p", None)
    out64, g64 = _ref(tensors, heads, torch.float64, do, **dict(kw))
    outlp, glp = _ref(tensors, heads, tensors[0].dtype, do, **dict(kw))
    assert_close_rule("out", out, out64, outlp, factor)
    scale = max(float(g.abs().max()) for g in g64)
    for name, g, r64, rlp in zip(GRAD_NAMES, grads, g64, glp):
        assert g.shape == r64.shape and g.dtype == tensors[0].dtype, name
        if name == "d_k_bias":
            # softmax is shift invariant along keys: the true key-bias gradient is exactly 0, so
            # its error is judged against the size of the other gradients
            assert float(g.abs().max()) <= 1e-4 * scale * (1 if g.dtype == torch.float32 else 100), name
            continue
        assert_close_rule(name, g, r64, rlp, factor)
    return out, grads


CASES = [
    # (B, Bkv, Lq, Lk, Dq, Dkv, H)
    (2, 2, 32, 57, 96, 72, 3),
    (3, 1, 17, 40, 64, 48, 2),    # image features of batch 1 broadcast over the queries
    (1, 2, 9, 33, 48, 40, 3),     # queries of batch 1 broadcast over the images
    (1, 1, 32, 257, 64, 88, 2),   # EVA's 257 tokens, odd feature width
    (1, 1, 70, 19, 32, 24, 2),    # InstructBLIP-like: more queries (32 + text) than one block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Bkv{}-{}x{}-Dq{}-Dkv{}-H{}".format(*c))
def test_fp32(case):
    b, bkv, lq, lk, dq, dkv, h = case
    check(_make(b, bkv, lq, lk, dq, dkv), h)


def test_blip2_real_width():
    """The real BLIP-2 cross-attention: hidden 768, 12 heads, EVA ViT-g features 257 x 1408."""
    check(_make(1, 1, 32, 257, 768, 1408), 12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(dtype):
    check(_make(2, 2, 32, 57, 128, 72, dtype), 2)


@pytest.mark.parametrize("kind", ["bool-2d", "float-2d", "hf-extended", "bool-4d"])
def test_masks(kind):
    t = _make(2, 2, 20, 45, 64, 40)
    if kind == "bool-2d":
        mask = torch.rand(2, 45, device=DEVICE) > 0.3
    elif kind == "float-2d":
        mask = (torch.rand(2, 45, device=DEVICE) > 0.3).float()
    elif kind == "hf-extended":
        keep = torch.rand(2, 45, device=DEVICE) > 0.3
        mask = (1.0 - keep.float())[:, None, None, :] * torch.finfo(torch.float32).min
    else:
        mask = torch.rand(2, 1, 20, 45, device=DEVICE) > 0.3
    check(t, 2, encoder_attention_mask=mask)


def test_fully_masked_image_gives_zero():
    t = _make(2, 2, 20, 45, 64, 40)
    mask = torch.rand(2, 45, device=DEVICE) > 0.3
    mask[1] = False
    out, grads = check(t, 2, encoder_attention_mask=mask)
    assert (out[1] == 0).all() and torch.isfinite(grads[0]).all()


def test_default_scale_and_explicit_scale():
    t = _make(1, 1, 8, 20, 32, 16)
    check(t, 2, scale=0.3)


# ----------------------------------------------------------------------------- dropout
def _dropout_probe(p, heads=2, lk=40, d=48, b=2, lq=24):
    """V = identity rows (E = I, Wv = [I | 0]ᵀ per head): the output reveals each head's kept
    probabilities, so the mask the kernel drew can be replayed by the reference."""
    dq = heads * d
    x = torch.randn(b, lq, dq, device=DEVICE)
    enc = torch.eye(lk, device=DEVICE).expand(b, lk, lk).contiguous()
    wq = torch.randn(dq, dq, device=DEVICE) / dq**0.5
    wk = torch.randn(dq, lk, device=DEVICE)
    wv = torch.zeros(dq, lk, device=DEVICE)
    for h in range(heads):
        wv[h * d:h * d + lk].copy_(torch.eye(lk))
    zeros = torch.zeros(dq, device=DEVICE)
    return [t.requires_grad_() for t in (x, enc, wq, zeros.clone(), wk, zeros.clone(), wv, zeros.clone())]


def test_dropout_reproducible_fraction_and_backward():
    p, heads, lk, d = 0.3, 2, 40, 48
    t = _dropout_probe(p, heads, lk, d)
    torch.manual_seed(7)
    with poisoned():
        out = mk.qformer_cross_attention(*t, heads, dropout_p=p, backend="triton")
    torch.manual_seed(7)
    again = mk.qformer_cross_attention(*t, heads, dropout_p=p, backend="triton")
    assert torch.equal(out, again), "torch.manual_seed must replay the dropout mask"
    b, lq = out.shape[:2]
    kept = torch.stack([out[:, :, h * d:h * d + lk] != 0 for h in range(heads)], dim=1)  # (B, H, Lq, Lk)
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 4 * (p * (1 - p) / kept.numel()) ** 0.5, frac
    do = torch.randn_like(out)
    grads = _grads(out, t, do)
    t64 = [a.detach().double().requires_grad_() for a in t]
    out64 = ref_qformer(*t64, heads, dropout_p=p, dropout_mask=kept)
    g64 = _grads(out64, t64, do.double())
    assert_close_abs("out", out, out64, 1e-5)
    for name, g, r in zip(GRAD_NAMES, grads, g64):
        assert_close_abs(name, g, r, 5e-5)


# ---------------------------------------------------------------- registration / compile
def test_opcheck():
    x, enc, wq, bq, wk, bk, wv, bv = _make(2, 1, 9, 21, 32, 24)
    mask = torch.rand(2, 1, 1, 21, device=DEVICE) > 0.2
    seed = torch.tensor([99], device=DEVICE)
    op = torch.ops.mmkernels.qformer_cross_attention_fwd.default
    torch.library.opcheck(op, (x, enc, wq, bq, wk, bk, wv, bv, mask, seed, 2, 0.1, 0.25))
    torch.library.opcheck(op, (x, enc, wq, bq, wk, bk, wv, bv, None, None, 2, 0.0, 0.25))
    with torch.no_grad():
        out, stats = op(x, enc, wq, bq, wk, bk, wv, bv, mask, seed, 2, 0.1, 0.25)
    args = [a.detach() for a in (x, enc, wq, bq, wk, bk, wv, bv)]
    torch.library.opcheck(torch.ops.mmkernels.qformer_cross_attention_bwd.default,
                          (torch.randn_like(out), *args, mask, seed, 2, 0.1, 0.25))


def test_compile_fullgraph():
    t = _make(2, 2, 9, 21, 32, 24)
    mask = torch.rand(2, 21, device=DEVICE) > 0.2

    def f(*args):
        return mk.qformer_cross_attention(*args, 2, encoder_attention_mask=mask, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*t)
    assert_close_abs("compiled", out, f(*t), 1e-6)
    g = torch.autograd.grad(out.sum(), t)
    g_ref = torch.autograd.grad(f(*t).sum(), t)
    for a, b in zip(g, g_ref):
        assert_close_abs("compiled grad", a, b, 1e-6)


# --------------------------------------------------------------------------- dispatch
def test_float64_goes_to_reference_and_forced_triton_raises():
    t = [a.detach().double() for a in _make(1, 1, 4, 6, 16, 8)]
    out = mk.qformer_cross_attention(*t, 2)
    assert out.dtype == torch.float64
    with pytest.raises(mk.BackendNotSupportedError, match="float64"):
        mk.qformer_cross_attention(*t, 2, backend="triton")


def test_sdpa_backend_matches():
    t = _make(2, 1, 9, 21, 32, 24)
    mask = torch.rand(2, 21, device=DEVICE) > 0.2
    a = mk.qformer_cross_attention(*t, 2, encoder_attention_mask=mask, backend="sdpa")
    b = mk.qformer_cross_attention(*t, 2, encoder_attention_mask=mask, backend="reference")
    assert_close_abs("sdpa vs reference", a, b, 1e-5)


# ------------------------------------------------------------------------ bad inputs
def _bad(**over):
    t = dict(zip(("hidden_states", "encoder_hidden_states", "q_weight", "q_bias", "k_weight", "k_bias",
                  "v_weight", "v_bias"), (a.detach() for a in _make(2, 2, 4, 6, 32, 24))))
    t["num_heads"] = 2
    t.update(over)
    return t


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(num_heads=3), r"num_heads: 3 does not divide the attention width 32"),
        (dict(num_heads=0), r"num_heads: expected a positive int"),
        (dict(encoder_hidden_states=torch.randn(2, 6, 20)), r"k_weight: expected \(A, Dkv\) = \(32, 20\)"),
        (dict(k_weight=torch.randn(32, 20)), r"k_weight: expected \(A, Dkv\) = \(32, 24\)"),
        (dict(v_weight=torch.randn(16, 24)), r"v_weight: expected"),
        (dict(q_weight=torch.randn(32, 31)), r"q_weight: expected \(A, Dq\)"),
        (dict(hidden_states=torch.randn(2, 4, 32, dtype=torch.float64)), r"encoder_hidden_states: expected dtype torch.float64"),
        (dict(k_bias=torch.randn(32, dtype=torch.float16)), r"k_bias: expected dtype torch.float32"),
        (dict(k_bias=torch.randn(31)), r"k_bias: expected shape \(32,\)"),
        (dict(hidden_states=torch.randn(8, 32)), r"hidden_states: expected \(B, Lq, Dq\)"),
        (dict(encoder_hidden_states=torch.randn(3, 6, 24)), r"encoder_hidden_states: batch must equal"),
        (dict(encoder_attention_mask=torch.ones(2, 7, dtype=torch.bool)), r"encoder_attention_mask: expected \(B, Lk\)"),
        (dict(encoder_attention_mask=torch.ones(2, 1, 1, 6, dtype=torch.int64)), r"encoder_attention_mask: a 3-D/4-D"),
        (dict(dropout_p=1.5), r"dropout_p"),
    ],
    ids=["heads-divide", "heads-zero", "enc-width", "kw-in", "vw-rows", "qw-in", "dtype", "bias-dtype",
         "bias-shape", "rank", "batch", "mask-2d", "mask-dtype", "dropout"],
)
def test_bad_inputs(over, match):
    with pytest.raises(ValueError, match=match):
        mk.qformer_cross_attention(**_bad(**over))


# ---------------------------------------------------------------- empty inputs, 1-D masks
@pytest.mark.parametrize("b, lq, lk", [(0, 5, 7), (2, 0, 7), (2, 5, 0)], ids=["B0", "Lq0", "Lk0"])
@pytest.mark.parametrize("backend", [None, "reference", "sdpa"])
def test_empty_inputs(b, lq, lk, backend):
    """The empty result (B, Lq, A); no image tokens (Lk = 0) gives zeros with zero gradients."""
    tensors = _make(b, b, lq, lk, 16, 12)
    if backend == "sdpa" and lk == 0:
        with pytest.raises(mk.BackendNotSupportedError, match="Lk = 0"):
            mk.qformer_cross_attention(*tensors, 2, backend=backend)
        return
    out = mk.qformer_cross_attention(*tensors, 2, backend=backend)
    assert out.shape == (b, lq, 16)
    assert torch.equal(out, torch.zeros_like(out))
    grads = _grads(out, tensors, torch.randn_like(out))
    for g, t in zip(grads, tensors):
        assert g.shape == t.shape and not g.abs().gt(0).any()


def test_one_dim_mask_is_an_sdpa_key_mask():
    """A (Lk,) encoder_attention_mask (SDPA semantics: True = attend) runs on every backend."""
    tensors = _make(2, 2, 5, 9, 16, 12)
    keep = torch.rand(9, device=DEVICE) > 0.4
    keep[0] = True
    expected = mk.qformer_cross_attention(*tensors, 2, encoder_attention_mask=keep[None].expand(2, -1),
                                          backend="reference")
    for backend in (None, "triton", "sdpa", "reference"):
        out = mk.qformer_cross_attention(*tensors, 2, encoder_attention_mask=keep, backend=backend)
        assert_close_abs(f"1-D mask [{backend}]", out, expected, 2e-5)


@pytest.mark.parametrize("heads, width", [(8, 32), (2, 24)], ids=["d4", "d12"])
def test_head_dims_not_multiple_of_8(heads, width):
    """HF's tiny test configs use head dims like 4: the Triton path runs them (padded tiles)."""
    check(_make(2, 2, 5, 19, width, 20), heads)


# ---------------------------------------------------------------- hoisted path
@pytest.fixture
def hoisted(monkeypatch):
    """The Triton backend's hoisted path (cuBLAS projections + attention kernels) at every batch."""
    monkeypatch.setattr(ops_qformer, "HOIST_MIN_BATCH", 0)
    assert ops_qformer.triton_path(1) == "hoisted"


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "B{}-Bkv{}-{}x{}-Dq{}-Dkv{}-H{}".format(*c))
def test_hoisted_path(hoisted, case):
    b, bkv, lq, lk, dq, dkv, h = case
    keep = torch.rand(max(b, bkv), lk, device=DEVICE) > 0.3
    keep[:, 0] = True
    check(_make(b, bkv, lq, lk, dq, dkv), h, encoder_attention_mask=keep)


def test_hoisted_and_fused_draw_the_same_dropout(monkeypatch):
    """Both Triton paths key Philox by (seed, batch·head, row·Lk + col): the same seed gives the same
    output whichever path the dispatcher takes."""
    t = _dropout_probe(0.3)
    outs = []
    for rule in (10**9, 0):  # fused, then hoisted
        monkeypatch.setattr(ops_qformer, "HOIST_MIN_BATCH", rule)
        torch.manual_seed(11)
        outs.append(mk.qformer_cross_attention(*t, 2, dropout_p=0.3, backend="triton"))
    assert_close_abs("fused vs hoisted", outs[1], outs[0], 1e-5)


def test_path_rule_default():
    from mmkernels.ops.qformer_cross_attention import HOIST_MIN_BATCH, triton_path

    assert triton_path(HOIST_MIN_BATCH - 1) == "fused" and triton_path(HOIST_MIN_BATCH) == "hoisted"
