"""``mmkernels.nn.MultiheadAttention`` against ``torch.nn.MultiheadAttention`` with the same weights.

Ground truth: torch's module in float64 (its ``need_weights=False`` path runs SDPA's math
kernel).  float64 runs on the reference / sdpa backends; float32 runs on the auto path, which is
the Triton kernel under ``TRITON_INTERPRET=1`` (slow: shapes stay small).  Outputs and the
gradients of every input and parameter are compared.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import mmkernels as mk
from mmkernels.nn import MultiheadAttention

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}
B, L, S = 2, 13, 16  # L odd on purpose; S != L for cross-attention

# name -> (constructor kwargs, input kinds it supports); head dims 16, 24, 32 (multiples of 8)
CONFIGS = {
    "e64h4": (dict(embed_dim=64, num_heads=4), ("self", "kv", "qkv")),
    "e48h2-kdim40-vdim56": (dict(embed_dim=48, num_heads=2, kdim=40, vdim=56), ("qkv",)),
    "e96h3-nobias": (dict(embed_dim=96, num_heads=3, bias=False), ("self", "kv")),
    "e64h2-biaskv-zeroattn": (dict(embed_dim=64, num_heads=2, add_bias_kv=True, add_zero_attn=True), ("self", "kv")),
}
CASES = [(name, kind) for name, (_, kinds) in CONFIGS.items() for kind in kinds]
CASE_IDS = [f"{name}-{kind}" for name, kind in CASES]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def make_pair(cfg: dict, dtype, batch_first: bool, backend=None, **extra):
    """(torch module, ours) with identical weights; biases made non-zero so bias bugs show."""
    ref = nn.MultiheadAttention(**cfg, **extra, batch_first=batch_first, dtype=dtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_(0.0, 0.5)
    ours = MultiheadAttention(**cfg, **extra, batch_first=batch_first, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict())
    ours.train(ref.training)
    return ref, ours


def make_inputs(cfg: dict, kind: str, dtype, batch_first: bool, batched: bool = True, lq: int = L, lk: int = S):
    """(query, key, value) leaves; ``kind`` self: q is k is v, kv: k is v, qkv: three tensors."""
    e = cfg["embed_dim"]
    kdim, vdim = cfg.get("kdim") or e, cfg.get("vdim") or e

    def t(n, f):
        shape = ((B, n, f) if batch_first else (n, B, f)) if batched else (n, f)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    if kind == "self":
        q = t(lq, e)
        return q, q, q
    if kind == "kv":
        k = t(lk, kdim)
        return t(lq, e), k, k
    return t(lq, e), t(lk, kdim), t(lk, vdim)


def run(module, q, k, v, **kw):
    """Output, weights and the gradients of the unique inputs and of every parameter for a
    fixed random output gradient (the same for every module given the same output shape)."""
    out, weights = module(q, k, v, **kw)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    leaves = list({id(x): x for x in (q, k, v) if x.requires_grad}.values())
    params = dict(module.named_parameters())
    grads = torch.autograd.grad((out * grad_out).sum(), leaves + list(params.values()), allow_unused=True)
    names = [f"input{i}" for i in range(len(leaves))] + list(params)
    return out, weights, dict(zip(names, grads, strict=True))


def assert_same(ref_mod, ours, q, k, v, tol, **kw):
    """Run both modules on the same inputs; compare outputs, weights and all gradients."""
    out_ref, w_ref, g_ref = run(ref_mod, q, k, v, **kw)
    out, w, g = run(ours, q, k, v, **kw)
    torch.testing.assert_close(out, out_ref, **tol, msg=lambda m: f"output: {m}")
    if w_ref is None:
        assert w is None
    else:
        torch.testing.assert_close(w, w_ref, **tol, msg=lambda m: f"attn weights: {m}")
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        if g_ref[name] is None:
            assert g[name] is None or not g[name].any(), name
            continue
        torch.testing.assert_close(g[name], g_ref[name], **tol, msg=lambda m, n=name: f"grad of {n}: {m}")
    return out


def mha_masks(kind: str, dtype, batch: int = B, heads: int = 2, lq: int = L, lk: int = S, batched: bool = True):
    """Masks in torch MHA's convention: bool True = do NOT attend; float additive. Key 0 is
    always allowed so no row is fully masked."""
    kpm = am = None
    if "kpm" in kind:
        drop = torch.rand(batch, lk) < 0.3
        drop[:, 0] = False
        kpm = drop if "kpm-bool" in kind else torch.randn(batch, lk, dtype=dtype).masked_fill(drop, float("-inf"))
        if not batched:
            kpm = kpm[0]
    if "am2" in kind or "am3" in kind:
        shape = (lq, lk) if "am2" in kind else ((batch * heads, lq, lk) if batched else (heads, lq, lk))
        drop = torch.rand(shape) < 0.3
        drop[..., 0] = False
        am = drop if "bool" in kind.split("am")[1] else torch.randn(shape, dtype=dtype).masked_fill(drop, float("-inf"))
    return kpm, am


MASK_KINDS = ["kpm-bool", "kpm-float", "am2-bool", "am2-float", "am3-bool", "am3-float",
              "kpm-bool+am2-bool", "kpm-bool+am3-bool", "kpm-float+am3-float", "kpm-float+am2-float"]


# --------------------------------------------------------------------------------------
# module contract
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_parameters_init_and_state_dict_keys(name):
    cfg = CONFIGS[name][0]
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(**cfg)
    torch.manual_seed(1)
    ours = MultiheadAttention(**cfg)
    assert isinstance(ours, nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, atol=0, rtol=0)


def test_bad_backend_name_raises():
    with pytest.raises(ValueError, match="backend"):
        MultiheadAttention(16, 2, backend="bogus")


def test_forced_backend_is_used():
    # the Triton backend rejects float64 before launching anything: a forced backend raises
    ours = MultiheadAttention(16, 2, dtype=torch.float64, backend="triton")
    x = torch.randn(5, 2, 16, dtype=torch.float64)
    with pytest.raises(mk.BackendNotSupportedError, match="float64"):
        ours(x, x, x, need_weights=False)


# --------------------------------------------------------------------------------------
# numerics against torch: float64 (reference and sdpa backends)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_torch_fp64(case, batch_first, backend):
    name, kind = case
    cfg = CONFIGS[name][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first, backend=backend)
    q, k, v = make_inputs(cfg, kind, torch.float64, batch_first)
    assert_same(ref, ours, q, k, v, TOL[torch.float64], need_weights=False)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("mask", MASK_KINDS)
def test_masks_match_torch_fp64(mask, batch_first):
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first, backend="reference")
    q, k, v = make_inputs(cfg, "kv", torch.float64, batch_first)
    kpm, am = mha_masks(mask, torch.float64, heads=cfg["num_heads"])
    assert_same(ref, ours, q, k, v, TOL[torch.float64], key_padding_mask=kpm, attn_mask=am, need_weights=False)


@pytest.mark.parametrize("mask", ["kpm-bool+am2-bool", "kpm-float+am3-float"])
def test_masks_with_bias_kv_and_zero_attn_fp64(mask):
    cfg = CONFIGS["e64h2-biaskv-zeroattn"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=True, backend="reference")
    q, k, v = make_inputs(cfg, "kv", torch.float64, batch_first=True)
    kpm, am = mha_masks(mask, torch.float64, heads=cfg["num_heads"])
    assert_same(ref, ours, q, k, v, TOL[torch.float64], key_padding_mask=kpm, attn_mask=am, need_weights=False)


@pytest.mark.parametrize("with_kpm", [False, True], ids=["mask-only", "with-kpm"])
def test_is_causal_hint_matches_torch_fp64(with_kpm):
    # torch: with no key_padding_mask the hint replaces attn_mask by SDPA's is_causal (top-left);
    # with one, the masks are used and the hint is dropped.  Same L != S as SDPA's convention.
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=False, backend="reference")
    q, k, v = make_inputs(cfg, "kv", torch.float64, batch_first=False)
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    kpm = mha_masks("kpm-bool", torch.float64)[0] if with_kpm else None
    assert_same(ref, ours, q, k, v, TOL[torch.float64], key_padding_mask=kpm, attn_mask=causal, is_causal=True,
                need_weights=False)


def test_is_causal_hint_ignores_mask_content_like_torch():
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=True, backend="reference")
    q, _, _ = make_inputs(cfg, "self", torch.float64, batch_first=True, lq=L, lk=L)
    not_causal = torch.rand(L, L) < 0.5  # a wrong hint: torch trusts it and never reads the mask
    not_causal[:, 0] = False
    assert_same(ref, ours, q, q, q, TOL[torch.float64], attn_mask=not_causal, is_causal=True, need_weights=False)


@pytest.mark.parametrize("kind", ["self", "qkv"])
@pytest.mark.parametrize("mask", ["none", "kpm-bool+am3-bool", "kpm-float+am2-float"])
def test_unbatched_matches_torch_fp64(mask, kind):
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=True, backend="reference")
    lk = L if kind == "self" else S
    q, k, v = make_inputs(cfg, kind, torch.float64, batch_first=True, batched=False, lk=lk)
    kpm, am = mha_masks(mask, torch.float64, heads=cfg["num_heads"], lk=lk, batched=False)
    out = assert_same(ref, ours, q, k, v, TOL[torch.float64], key_padding_mask=kpm, attn_mask=am,
                      need_weights=False)
    assert out.shape == (L, cfg["embed_dim"])


def test_fully_masked_row_matches_torch_need_weights_false():
    # torch's need_weights=False path returns attention 0 there (out = out_proj.bias); so do we
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=True, backend="reference")
    q, k, v = make_inputs(cfg, "kv", torch.float64, batch_first=True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1] = True
    out = assert_same(ref, ours, q, k, v, TOL[torch.float64], key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out[1], ours.out_proj.bias.expand(L, -1).detach())


def test_mixed_mask_types_warn_like_torch():
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=True, backend="reference")
    q, k, v = make_inputs(cfg, "kv", torch.float64, batch_first=True)
    kpm, _ = mha_masks("kpm-bool", torch.float64)
    _, am = mha_masks("am2-float", torch.float64)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        out_ref, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        out, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float64])


# --------------------------------------------------------------------------------------
# need_weights=True: torch's own forward, no warning
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per-head"])
def test_need_weights_returns_torch_weights(average):
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=False)
    q, k, v = make_inputs(cfg, "kv", torch.float64, batch_first=False)
    kpm, am = mha_masks("kpm-bool+am3-bool", torch.float64, heads=cfg["num_heads"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # need_weights=True falls back silently
        assert_same(ref, ours, q, k, v, TOL[torch.float64], key_padding_mask=kpm, attn_mask=am,
                    average_attn_weights=average)
        _, w = ours(q, k, v, average_attn_weights=average)  # torch's default need_weights=True
    assert w.shape == ((B, L, S) if average else (B, cfg["num_heads"], L, S))


def test_nested_tensor_falls_back_to_torch():
    ref, ours = make_pair(dict(embed_dim=32, num_heads=2), torch.float32, batch_first=True)
    ref.eval()
    ours.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "nested tensors are a prototype" warning
        nt = torch.nested.nested_tensor([torch.randn(5, 32), torch.randn(3, 32)])
    with torch.no_grad():
        out_ref, _ = ref(nt, nt, nt, need_weights=False)
        with pytest.warns(UserWarning, match="nested"):
            out, _ = ours(nt, nt, nt, need_weights=False)
    for a, b in zip(out.unbind(), out_ref.unbind(), strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------
# float32 on the auto path (Triton under the interpreter when no GPU)
# --------------------------------------------------------------------------------------
FP32_CASES = [("e64h4", "self", "none"), ("e64h4", "kv", "kpm-bool+am3-float"),
              ("e48h2-kdim40-vdim56", "qkv", "kpm-float+am2-bool"), ("e96h3-nobias", "self", "am2-bool"),
              ("e64h2-biaskv-zeroattn", "kv", "kpm-bool")]


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("case", FP32_CASES, ids=["-".join(c) for c in FP32_CASES])
def test_matches_torch_fp32_auto(case, batch_first):
    name, kind, mask = case
    cfg = CONFIGS[name][0]
    ref, ours = make_pair(cfg, torch.float32, batch_first)
    lk = L if kind == "self" else S
    q, k, v = make_inputs(cfg, kind, torch.float32, batch_first, lk=lk)
    kpm, am = mha_masks(mask, torch.float32, heads=cfg["num_heads"], lk=lk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # mixed bool/float masks: torch's deprecation warning
        assert_same(ref, ours, q, k, v, TOL[torch.float32], key_padding_mask=kpm, attn_mask=am, need_weights=False)


def test_matches_torch_fp32_forced_triton():
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float32, batch_first=True)
    q, k, v = make_inputs(cfg, "kv", torch.float32, batch_first=True)
    kpm, am = mha_masks("kpm-bool+am2-bool", torch.float32, heads=cfg["num_heads"])
    with mk.use_backend("triton"):
        assert_same(ref, ours, q, k, v, TOL[torch.float32], key_padding_mask=kpm, attn_mask=am, need_weights=False)


def test_unbatched_fp32_auto():
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float32, batch_first=False)
    q, k, v = make_inputs(cfg, "qkv", torch.float32, batch_first=False, batched=False)
    kpm, am = mha_masks("kpm-bool+am3-bool", torch.float32, heads=cfg["num_heads"], batched=False)
    assert_same(ref, ours, q, k, v, TOL[torch.float32], key_padding_mask=kpm, attn_mask=am, need_weights=False)


# --------------------------------------------------------------------------------------
# dropout: only in training, replayed by torch.manual_seed
# --------------------------------------------------------------------------------------
def test_dropout_eval_vs_train():
    cfg = CONFIGS["e64h4"][0]
    ref, ours = make_pair(cfg, torch.float32, batch_first=True, dropout=0.3)
    q, k, v = make_inputs(cfg, "self", torch.float32, batch_first=True)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        out_eval, _ = ours(q, k, v, need_weights=False)
        torch.testing.assert_close(out_eval, ref(q, k, v, need_weights=False)[0], **TOL[torch.float32])
    ours.train()
    torch.manual_seed(123)
    out1, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(123)
    out2, _ = ours(q, k, v, need_weights=False)
    torch.manual_seed(124)
    out3, _ = ours(q, k, v, need_weights=False)
    torch.testing.assert_close(out1, out2, atol=0, rtol=0)
    assert not torch.allclose(out1, out_eval, atol=1e-3)
    assert not torch.allclose(out1, out3, atol=1e-3)
    (g,) = torch.autograd.grad(out1.sum(), q)
    assert torch.isfinite(g).all()


# --------------------------------------------------------------------------------------
# from_torch and state_dict round trip
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_from_torch_shares_parameters(name):
    cfg = CONFIGS[name][0]
    ref = nn.MultiheadAttention(**cfg, batch_first=True, dtype=torch.float64, dropout=0.1).eval()
    ours = MultiheadAttention.from_torch(ref, backend="reference")
    assert not ours.training
    assert ours.backend == "reference"
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert n1 == n2 and p1 is p2
    for attr in ("embed_dim", "kdim", "vdim", "num_heads", "head_dim", "dropout", "batch_first", "add_zero_attn",
                 "_qkv_same_embed_dim"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    kind = CONFIGS[name][1][0]
    q, k, v = make_inputs(cfg, kind, torch.float64, batch_first=True)
    with torch.no_grad():
        for p in ref.parameters():  # a change through torch's module is seen by ours
            p.add_(torch.randn_like(p) * 0.1)
        out_ref, _ = ref(q, k, v, need_weights=False)
        out, _ = ours(q, k, v, need_weights=False)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float64])
    ref.train()
    assert not ours.training  # separate flags, copied once, like two modules sharing weights


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_round_trip(name):
    cfg = CONFIGS[name][0]
    ref, ours = make_pair(cfg, torch.float64, batch_first=False, backend="reference")
    fresh_torch = nn.MultiheadAttention(**cfg, dtype=torch.float64)
    fresh_torch.load_state_dict(ours.state_dict())  # strict
    fresh_ours = MultiheadAttention(**cfg, dtype=torch.float64, backend="reference")
    fresh_ours.load_state_dict(fresh_torch.state_dict())
    q, k, v = make_inputs(cfg, CONFIGS[name][1][0], torch.float64, batch_first=False)
    with torch.no_grad():
        out_ref, _ = ref(q, k, v, need_weights=False)
        for m in (fresh_torch, fresh_ours):
            torch.testing.assert_close(m(q, k, v, need_weights=False)[0], out_ref, **TOL[torch.float64])


# --------------------------------------------------------------------------------------
# bad inputs raise what torch raises
# --------------------------------------------------------------------------------------
def _bad_cases():
    e = 64
    x = torch.randn(L, B, e)
    y = torch.randn(S, B, e)
    boolm = lambda *s: torch.zeros(s, dtype=torch.bool)  # noqa: E731
    return {
        "wrong-embed-dim": ((torch.randn(L, B, 32),) * 3, {}),
        "4d-query": ((torch.randn(1, L, B, e),) * 3, {}),
        "unbatched-query-batched-key": ((x[:, 0], y, y), {}),
        "key-value-shape-mismatch": ((x, y, torch.randn(S + 1, B, e)), {}),
        "int-attn-mask": ((x, y, y), dict(attn_mask=torch.zeros(L, S, dtype=torch.int64))),
        "uint8-kpm": ((x, y, y), dict(key_padding_mask=torch.zeros(B, S, dtype=torch.uint8))),
        "attn-mask-2d-shape": ((x, y, y), dict(attn_mask=boolm(L, L))),
        "attn-mask-3d-shape": ((x, y, y), dict(attn_mask=boolm(B, L, S))),
        "attn-mask-4d": ((x, y, y), dict(attn_mask=boolm(B, 4, L, S))),
        "kpm-1d-batched": ((x, y, y), dict(key_padding_mask=boolm(S))),
        "kpm-batch": ((x, y, y), dict(key_padding_mask=boolm(B + 1, S))),
        "kpm-length": ((x, y, y), dict(key_padding_mask=boolm(B, S - 1))),
        "is-causal-without-mask": ((x, x, x), dict(is_causal=True)),
        "float64-mask-float32-query": ((x, y, y), dict(attn_mask=torch.zeros(L, S, dtype=torch.float64))),
        "unbatched-3d-mask-shape": ((x[:, 0], y[:, 0], y[:, 0]), dict(attn_mask=boolm(4 + 1, L, S))),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_raise_like_torch(case):
    args, kw = _bad_cases()[case]
    ref = nn.MultiheadAttention(64, 4)
    ours = MultiheadAttention.from_torch(ref, backend="reference")
    with pytest.raises(Exception) as torch_exc:
        ref(*args, need_weights=False, **kw)
    with pytest.raises(torch_exc.type):
        ours(*args, need_weights=False, **kw)
