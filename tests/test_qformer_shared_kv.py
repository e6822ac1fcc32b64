"""A patched BLIP-2 / InstructBLIP Q-Former projects K and V of all its cross-attention layers with
ONE GEMM per forward (:class:`mmkernels.nn.QFormerSharedKV`): outputs and gradients equal the
unpatched HF model's (float64 rule) and today's per-layer path's, the GEMMs reading the image
features are counted, the rule / forced modes / fallbacks hold, and ``unpatch`` restores.

Tiny random models (hidden 64, 4 heads of 16, image width 40, 17 image tokens, 4 layers with
cross-attention every 2nd: 2 cross layers), no downloads."""

from __future__ import annotations

import contextlib
import copy
import importlib

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, assert_close_rule, poisoned
from torch.utils._python_dispatch import TorchDispatchMode

import mmkernels as mk
from mmkernels.nn import QFormerSharedKV

ops_qformer = importlib.import_module("mmkernels.ops.qformer_cross_attention")  # mk.ops.qformer_cross_attention: the op

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N_CROSS = 2  # 4 layers, cross_attention_frequency 2
ATOL = 2e-5  # fp32, shared vs per-layer: one GEMM of another width, summation order only

_GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
          torch.ops.aten.baddbmm.default}


class _GemmsReading(TorchDispatchMode):
    """Counts the aten GEMMs with an operand in ``tensor``'s storage (a K/V projection reads the image
    features; so does the backward's dW = dYᵀ·X)."""

    def __init__(self, tensor):
        super().__init__()
        self.ptr = tensor.untyped_storage().data_ptr()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS and any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.ptr
                                  for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


_FAMILIES = {"blip2": "Blip2QFormer", "instructblip": "InstructBlipQFormer",
             "instructblipvideo": "InstructBlipVideoQFormer"}


def _config(kind, dropout=0.0):
    name = _FAMILIES[kind] + "Config"
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    cfg = cls(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96, encoder_hidden_size=40,
              cross_attention_frequency=2, attention_probs_dropout_prob=dropout, hidden_dropout_prob=dropout,
              vocab_size=50)
    cfg._attn_implementation = "eager"
    return cfg


def _qformer(kind, dropout=0.0):
    model_cls = getattr(transformers, _FAMILIES[kind] + "Model")
    torch.manual_seed(0)
    model = model_cls(_config(kind, dropout)).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():  # HF leaves biases at 0: random ones test more
            if name.endswith("bias") and "LayerNorm" not in name:
                p.normal_(std=0.2)
    return model


def _inputs(kind, batch=3):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, 5, 64, generator=g).to(DEVICE)
    enc = torch.randn(batch, 17, 40, generator=g).to(DEVICE)
    inp = dict(query_embeds=q, encoder_hidden_states=enc)
    if kind != "blip2":  # instruction tokens after the queries (they skip cross-attention), padded
        inp["input_ids"] = torch.randint(1, 50, (batch, 4), generator=g).to(DEVICE)
        mask = torch.ones(batch, 9, dtype=torch.long, device=DEVICE)
        mask[-1, -2:] = 0
        inp["attention_mask"] = mask
        emask = torch.ones(batch, 17, dtype=torch.long, device=DEVICE)
        emask[0, 11:] = 0  # padded image tokens
        inp["encoder_attention_mask"] = emask
    return inp


def _run(model, inp, dtype=torch.float32, grad=True):
    """Output and the gradients of every parameter, the queries and the image features."""
    model = model.to(dtype)
    leaves = {k: (v.to(dtype).detach().requires_grad_(grad) if v.is_floating_point() else v) for k, v in inp.items()}
    for p in model.parameters():
        p.grad = None
    with torch.set_grad_enabled(grad):
        out = model(**leaves).last_hidden_state
    grads = {}
    if grad:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)
        out.backward(dout)
        grads = {n: p.grad for n, p in model.named_parameters()}
        grads.update({k: v.grad for k, v in leaves.items() if v.is_floating_point()})
    return out.detach(), grads


@contextlib.contextmanager
def _route(name):
    """The per-layer call's route: "hoisted" (Triton, HOIST_MIN_BATCH = 0), "fused" (Triton, the
    default rule at these batches), "sdpa" (with SHARED_KV_ON_CPU: the rule as on a GPU)."""
    saved = ops_qformer.HOIST_MIN_BATCH, ops_qformer.SHARED_KV_ON_CPU
    ops_qformer.HOIST_MIN_BATCH = {"hoisted": 0, "fused": 10**9}.get(name, saved[0])
    ops_qformer.SHARED_KV_ON_CPU = name == "sdpa"
    try:
        with mk.use_backend("sdpa" if name == "sdpa" else "triton"):
            yield
    finally:
        ops_qformer.HOIST_MIN_BATCH, ops_qformer.SHARED_KV_ON_CPU = saved


def _shared(model) -> QFormerSharedKV:
    return model.encoder.mmkernels_shared_kv


def _patch(model, **kw):
    """mk.patch, with the self-attention layers pinned to SDPA: only the cross-attention under test
    runs in the (slow) Triton interpreter."""
    report = mk.patch(model, **kw)
    for m in model.modules():
        if isinstance(m, mk.nn.QFormerAttention) and not m.is_cross_attention:
            m.backend = "sdpa"
    return report


@pytest.mark.parametrize("kind,route", [("blip2", "sdpa"), ("instructblip", "hoisted")])
def test_parity_with_hf_and_per_layer_path(kind, route):
    hf = _qformer(kind).train()  # training mode (dropout 0): the training route, exactly
    inp = _inputs(kind, batch=2 if route == "hoisted" else 3)
    ref64, g64 = _run(copy.deepcopy(hf), inp, torch.float64)
    ref32, g32 = _run(hf, inp)
    model = copy.deepcopy(hf)
    report = _patch(model)
    assert any(p == "encoder" and "QFormerSharedKV" in what for p, _, what in report.methods), str(report)
    shared = _shared(model)
    assert shared.mode is None and len(shared.layers) == N_CROSS

    with _route(route), poisoned(), mk.dispatch.record() as calls, _GemmsReading(inp["encoder_hidden_states"]) as gm:
        out, grads = _run(model, inp)
    assert gm.count == 2, f"expected 1 K/V GEMM forward + 1 dW GEMM backward reading the image, got {gm.count}"
    assert shared.projections == 1 and not shared.active
    assert ("qformer_cross_attention", "triton") not in calls and ("qformer_cross_attention", "sdpa") not in calls
    assert_close_rule("output vs HF (float64)", out, ref64.float(), ref32)
    for name, g in g64.items():
        if g is None:
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, f"no gradient reached {name}"
        assert_close_rule(f"grad {name} vs HF (float64)", grads[name], g.float(), g32[name], factor=3.0)
    kv_params = [n for n in grads if "crossattention.attention.key" in n or "crossattention.attention.value" in n]
    assert len(kv_params) == 4 * N_CROSS and all(grads[n].abs().sum() > 0 for n in kv_params)

    shared.mode = False  # today's per-layer path: 2 GEMMs per layer forward, 2 backward
    with _route(route), _GemmsReading(inp["encoder_hidden_states"]) as gm:
        out_pl, grads_pl = _run(model, inp)
    assert gm.count == 4 * N_CROSS and shared.projections == 1
    assert_close_abs("shared vs per-layer output", out, out_pl, ATOL)
    for name, g in grads_pl.items():
        if g is not None:
            assert_close_abs(f"shared vs per-layer grad {name}", grads[name], g, ATOL * 5)

    undone = mk.unpatch(model)
    assert undone is report and "forward" not in model.encoder.__dict__
    assert not hasattr(model.encoder, "mmkernels_shared_kv")
    assert all(layer._shared_kv is None for layer in shared.layers) and shared._cache is None
    again, _ = _run(model, inp, grad=False)
    assert torch.equal(again, _run(hf, inp, grad=False)[0])


@pytest.mark.parametrize("kind", list(_FAMILIES))
def test_every_qformer_family_shares(kind):
    model = _qformer(kind).eval()
    inp = _inputs(kind)
    with torch.no_grad():
        ref = model(**inp).last_hidden_state
    report = mk.patch(model)
    assert any("QFormerSharedKV" in what for _, _, what in report.methods), str(report)
    with torch.no_grad(), _route("sdpa"), _GemmsReading(inp["encoder_hidden_states"]) as gm:
        out = model(**inp).last_hidden_state
    assert gm.count == 1 and _shared(model).projections == 1
    assert_close_abs(f"{kind} shared vs HF", out, ref, ATOL)
    mk.unpatch(model)


def test_rule_and_forced_modes():
    model = _qformer("blip2").eval()
    inp = _inputs("blip2", batch=2)
    with torch.no_grad():
        ref = model(**inp).last_hidden_state
    _patch(model)
    shared = _shared(model)
    enc = inp["encoder_hidden_states"]

    def run():
        with torch.no_grad(), mk.dispatch.record() as calls, _GemmsReading(enc) as gm:
            out = model(**inp).last_hidden_state
        assert_close_abs("patched vs HF", out, ref, ATOL)
        return [c for c in calls if c[0] == "qformer_cross_attention"], gm.count

    # auto, Triton at batch 2 < HOIST_MIN_BATCH: the fused per-layer kernel (K/V never in memory)
    with mk.use_backend("triton"):
        assert ops_qformer.triton_path(2) == "fused"
        assert run() == ([("qformer_cross_attention", "triton")] * N_CROSS, 0) and shared.projections == 0
        shared.mode = True  # forced shared: one GEMM, even where the fused kernel would run
        assert run() == ([], 1) and shared.projections == 1
        shared.mode = None
        saved = ops_qformer.SHARED_KV_MIN_BATCH
        ops_qformer.SHARED_KV_MIN_BATCH = 2  # a benchmark's overrule: share from batch 2
        try:
            assert run() == ([], 1)
        finally:
            ops_qformer.SHARED_KV_MIN_BATCH = saved
    with mk.use_backend("sdpa"):  # SDPA: shared on a GPU; on a CPU only with SHARED_KV_ON_CPU
        assert ops_qformer.shares_kv("sdpa", 1, "cuda") and not ops_qformer.shares_kv("sdpa", 64, enc.device)
        assert run() == ([("qformer_cross_attention", "sdpa")] * N_CROSS, 2 * N_CROSS)
    with _route("sdpa"):
        assert run() == ([], 1)
    mk.unpatch(model)

    report = mk.patch(model, qformer_shared_kv=False)
    assert any("qformer_shared_kv=False" in why for _, _, why in report.skipped), str(report)
    assert "forward" not in model.encoder.__dict__
    with _route("sdpa"):
        assert run() == ([("qformer_cross_attention", "sdpa")] * N_CROSS, 2 * N_CROSS)
    mk.unpatch(model)
    with pytest.raises(ValueError, match="qformer_shared_kv"):
        mk.patch(model, qformer_shared_kv="yes")


@pytest.mark.parametrize("route", ["hoisted", "sdpa"])
def test_dropout_same_masks_as_per_layer_path_and_trains(route):
    model = _qformer("blip2", dropout=0.25).train()
    inp = _inputs("blip2", batch=2)
    _patch(model)
    shared = _shared(model)
    with _route(route):
        outs = []
        for mode in (None, False):
            shared.mode = mode
            torch.manual_seed(7)
            outs.append(_run(model, inp))
        with torch.no_grad():
            torch.manual_seed(7)
            plain = model.eval()(**inp).last_hidden_state
        model.train()
    shared.mode = None
    (out, grads), (out_pl, grads_pl) = outs
    assert shared.projections == 1
    assert (out - plain).abs().max() > 0.1, "dropout did not act"
    # the same seed drops the same probabilities on both paths
    assert_close_abs("shared vs per-layer output (dropout 0.25)", out, out_pl, ATOL)
    for name, g in grads_pl.items():
        if g is not None:
            assert_close_abs(f"grad {name}", grads[name], g, ATOL * 5)
    if route != "sdpa":  # the training loop below is route-independent: once is enough
        return
    # it trains: an SGD step on the shared path lowers a loss on a fixed target
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with _route(route):
        for _ in range(2):
            torch.manual_seed(11)  # the same dropout masks both steps
            loss = (model(**inp).last_hidden_state - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert losses[1] < losses[0] and shared.projections == 3


def test_other_features_or_modified_features_fall_back():
    model = _qformer("blip2").eval()
    inp = _inputs("blip2")
    enc = inp["encoder_hidden_states"]
    layer2 = model.encoder.layer[2].crossattention

    def swap(module, args, kwargs):  # this layer sees other features than the forward was given
        return args, {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"] * 0.5}

    def bump(module, args, kwargs):  # the same tensor, modified in place (same values)
        kwargs["encoder_hidden_states"].mul_(1.0)

    for hook_fn, ours in ((swap, 0), (bump, 2)):
        hook = layer2.register_forward_pre_hook(hook_fn, with_kwargs=True)
        with torch.no_grad():
            ref = model(**inp).last_hidden_state
        mk.patch(model)
        shared = _shared(model)
        with torch.no_grad(), _route("sdpa"), _GemmsReading(enc) as gm:
            out = model(**inp).last_hidden_state
        # the shared GEMM (layers 0 and 2) + layer 2's own K and V where it read the image itself
        assert gm.count == 1 + ours and shared.projections == 1, (hook_fn.__name__, gm.count)
        assert_close_abs(f"fallback ({hook_fn.__name__}) vs HF", out, ref, ATOL)
        mk.unpatch(model)
        hook.remove()

    # consecutive forwards on other images never reuse K/V; an exception closes the scope
    mk.patch(model)
    shared = _shared(model)
    with _route("sdpa"), torch.no_grad():
        for scale in (1.0, -2.0):
            other = dict(inp, encoder_hidden_states=enc * scale)
            got = model(**other).last_hidden_state
            mk.unpatch(model)
            want = model(**other).last_hidden_state
            mk.patch(model)
            assert_close_abs(f"image x{scale}", got, want, ATOL)
            assert not _shared(model).active
        shared = _shared(model)
        hook = layer2.register_forward_pre_hook(lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            model(**inp)
        hook.remove()
        assert not shared.active and shared._scopes == []
    # a copy shares within itself
    twin, before = copy.deepcopy(model), shared.projections
    with _route("sdpa"), torch.no_grad():
        twin(**inp)
    assert _shared(twin).layers[0] is twin.encoder.layer[0].crossattention.attention
    assert _shared(twin).projections == before + 1 and shared.projections == before
    mk.unpatch(model)


def test_weight_cache_follows_parameters():
    model = _qformer("blip2").eval()
    inp = _inputs("blip2")
    mk.patch(model, qformer_shared_kv=True)
    shared = _shared(model)
    with mk.use_backend("sdpa"):
        with torch.no_grad():
            first = model(**inp).last_hidden_state
            cached = shared._cache[1]
            assert torch.equal(model(**inp).last_hidden_state, first) and shared._cache[1] is cached
            shared.layers[1].value.weight.add_(0.1)  # an in-place update (an optimizer step, load_state_dict)
            updated = model(**inp).last_hidden_state
            assert shared._cache[1] is not cached
            shared.mode = False
            assert_close_abs("after an in-place weight update", updated, model(**inp).last_hidden_state, ATOL)
            shared.mode = True
        # with autograd the weights are concatenated in the graph, and the cache is dropped
        _, grads = _run(model, inp)
        assert shared._cache is None and grads["encoder.layer.2.crossattention.attention.value.bias"] is not None
        with torch.inference_mode():
            model(**inp)
        assert shared._cache[1].is_inference()
        # frozen weights with autograd on the image: an inference-mode cache cannot be saved for backward
        for p in model.parameters():
            p.requires_grad_(False)
        enc = inp["encoder_hidden_states"].clone().requires_grad_()
        model(**dict(inp, encoder_hidden_states=enc)).last_hidden_state.sum().backward()
        assert enc.grad is not None and enc.grad.abs().sum() > 0
    mk.unpatch(model)


def test_gradient_checkpointing_projects_per_layer():
    hf = _qformer("blip2").train()
    inp = _inputs("blip2")
    ref, gref = _run(hf, inp)
    model = copy.deepcopy(hf)
    model.gradient_checkpointing_enable()
    mk.patch(model)
    shared = _shared(model)
    with _route("sdpa"):
        out, grads = _run(model, inp)
    assert shared.projections == 0  # the replayed layers project their own K/V, as the first pass did
    assert_close_abs("checkpointed output", out, ref, ATOL)
    for name, g in gref.items():
        if g is not None:
            assert_close_abs(f"checkpointed grad {name}", grads[name], g, ATOL * 5)
    with _route("sdpa"), torch.no_grad():  # no backward to replay: shared
        model(**inp)
    assert shared.projections == 1
    mk.unpatch(model)
