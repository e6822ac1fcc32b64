"""``output_attentions=True`` on a model patched by ``mmkernels.patch`` (or loaded with
``attn_implementation="mmkernels"``) is never silently dropped: the calls asked for weights run
the model's eager attention (one warning per process), so the attentions and hidden states equal
the unpatched ``"eager"`` model's (fp32, 1e-5), one tensor per layer; gradients reach them
(transformers' ``test_retain_grad_hidden_states_attentions``).  Models the user set to
``"eager"`` are left alone by ``patch`` unless ``override_eager=True``.

transformers' own ``sdpa`` (5.x, ``integrations/sdpa_attention.py``) warns once and returns
``None`` weights instead, so its models return no attentions."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs

import mmkernels as mk
from mmkernels import dispatch
from mmkernels.integrations import hf as mk_hf

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:attn_implementation='mmkernels' with output_attentions")

ATOL = 1e-5
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
            patch_size=4)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4)
LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)


def _cls(name: str):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    """The output_attentions warning is once per process: re-arm it for each test."""
    monkeypatch.setattr(mk_hf, "_output_attentions_warned", False, raising=False)


def _oa_warnings(record):
    return [w for w in record if "output_attentions" in str(w.message) and "mmkernels" in str(w.message)]


def _eager_twin(model):
    """An unpatched copy of ``model`` on transformers' eager attention (the reference)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin


def _assert_same(name, got, ref, layers, shape=None):
    assert got is not None and len(got) == layers, f"{name}: {None if got is None else len(got)} != {layers}"
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g is not None, f"{name}[{i}] is None"
        if shape is not None:
            assert tuple(g.shape) == shape, f"{name}[{i}]: {tuple(g.shape)} != {shape}"
        assert_close_abs(f"{name}[{i}]", g, r, ATOL)


def _check_against_eager(model, run, *, layers, attn_shape, fused_per_forward=0, keep=None):
    """run(model, output_attentions) -> model output; patched vs the eager twin, one warning.
    ``fused_per_forward``: mmkernels attention calls whose weights nobody asked for (SigLIP's
    pooling head) that still take the fused path."""
    eager = _eager_twin(model)
    with torch.no_grad():
        ref = run(eager, True)
    assert len(ref.attentions) == layers  # the reference really has them
    report = mk.patch(model)
    assert report.configs, str(report)
    with warnings.catch_warnings(record=True) as record, torch.no_grad(), dispatch.record() as calls:
        warnings.simplefilter("always")
        out = run(model, True)
        again = run(model, True)  # a second forward: no second warning
    for o in (out, again):
        _assert_same("attentions", o.attentions, ref.attentions, layers, attn_shape)
        _assert_same("hidden_states", o.hidden_states, ref.hidden_states, layers + 1)
        assert_close_abs("last_hidden_state", o.last_hidden_state, ref.last_hidden_state, ATOL)
    assert len(_oa_warnings(record)) == 1, [str(w.message) for w in record]
    msg = str(_oa_warnings(record)[0].message)
    assert "O(L^2)" in msg and "eager" in msg and "no fused kernel" in msg
    assert sum(op == "attention" for op, _ in calls) == 2 * fused_per_forward, calls
    # without output_attentions the fused kernel runs and nothing is collected
    with torch.no_grad(), dispatch.record() as calls:
        plain = run(model, False)
    assert any(op == "attention" for op, _ in calls), calls
    assert not plain.attentions
    fused, want = plain.last_hidden_state, ref.last_hidden_state
    if keep is not None:  # padded queries: every key masked, eager gives a uniform row, the kernel 0
        fused, want = fused[keep], want[keep]
    assert_close_abs("fused last_hidden_state", fused, want, 2e-5)
    mk.unpatch(model)
    return report


# ----------------------------------------------------------------------------- vision towers
def _clip(**kw):
    cfg = _cls("CLIPVisionConfig")(**CLIP, **kw)
    return _cls("CLIPVisionModel")(cfg).to(DEVICE).eval()


def test_clip_vision_attentions_equal_eager():
    torch.manual_seed(0)
    model = _clip()
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)
    run = lambda m, oa: m(pixel_values=pix, output_attentions=oa, output_hidden_states=True)  # noqa: E731
    _check_against_eager(model, run, layers=2, attn_shape=(2, 2, 17, 17))


def test_siglip_vision_attentions_equal_eager():
    torch.manual_seed(0)
    cfg = _cls("SiglipVisionConfig")(**SIGLIP, vision_use_head=True)
    model = _cls("SiglipVisionModel")(cfg).to(DEVICE).eval()
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)
    run = lambda m, oa: m(pixel_values=pix, output_attentions=oa, output_hidden_states=True)  # noqa: E731
    report = _check_against_eager(model, run, layers=2, attn_shape=(2, 2, 16, 16), fused_per_forward=1)
    assert any(new.endswith("WeightlessMultiheadAttention") for _, _, new in report.replaced), str(report)


def test_register_hf_attn_implementation_returns_attentions():
    """Loaded with attn_implementation="mmkernels" (no patch): same contract."""
    torch.manual_seed(0)
    mk.register_hf()
    cfg = _cls("CLIPVisionConfig")(**CLIP)
    model = _cls("CLIPVisionModel")._from_config(cfg, attn_implementation="mmkernels").to(DEVICE).eval()
    assert model.config._attn_implementation == "mmkernels"
    eager = _eager_twin(model)
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        out = model(pixel_values=pix, output_attentions=True)
        ref = eager(pixel_values=pix, output_attentions=True)
    _assert_same("attentions", out.attentions, ref.attentions, 2, (2, 2, 17, 17))
    assert len(_oa_warnings(record)) == 1


def test_config_output_attentions_without_kwarg():
    """``output_attentions=True`` on the config (set at construction, so HF kept sdpa): the flag
    never reaches the attention function, transformers' output recorder asks for the weights."""
    torch.manual_seed(0)
    model = _clip(output_attentions=True)
    assert model.config._attn_implementation != "eager" and model.config.output_attentions
    eager = _eager_twin(model)
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)
    mk.patch(model)
    with torch.no_grad():
        out, ref = model(pixel_values=pix), eager(pixel_values=pix)
    _assert_same("attentions", out.attentions, ref.attentions, 2, (2, 2, 17, 17))
    mk.unpatch(model)


# ----------------------------------------------------------------------------- causal LM (Qwen2-VL text)
def _qwen2_vl_text():
    Config = _cls("Qwen2VLConfig")
    cfg = Config(vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=2,
                                    spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2),
                 text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=64,
                                  rope_scaling=dict(type="mrope", mrope_section=[2, 1, 1])))
    return _cls("Qwen2VLForConditionalGeneration")(cfg).to(DEVICE).eval().model.language_model


@pytest.mark.parametrize("padded", [False, True], ids=["causal-no-mask", "left-padding"])
def test_qwen2_vl_text_attentions_equal_eager(padded):
    """GQA, causal: with no padding the mask interface gives None (is_causal carries it) and the
    eager fallback must build the causal mask; with padding the boolean mask becomes additive."""
    torch.manual_seed(0)
    model = _qwen2_vl_text()
    ids = torch.randint(0, 60, (2, 7), device=DEVICE)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
    kw = dict(attention_mask=mask) if padded else {}
    run = lambda m, oa: m(input_ids=ids, output_attentions=oa, output_hidden_states=True, **kw)  # noqa: E731
    _check_against_eager(model, run, layers=2, attn_shape=(2, 4, 7, 7), keep=mask.bool())


# ----------------------------------------------------------------------------- BLIP-2
def _blip2():
    cfg = _cls("Blip2Config")(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            encoder_hidden_size=32, cross_attention_frequency=1),
        text_config=LLAMA, num_query_tokens=4, image_token_index=63)
    return _cls("Blip2ForConditionalGeneration")(cfg).to(DEVICE).eval()


@pytest.mark.parametrize("hooks_first", [False, True], ids=["patch-fresh", "hooks-installed-before-patch"])
def test_blip2_vision_qformer_lm_attentions_equal_eager(hooks_first):
    """EVA vision tower and LLaMA LM through the attention interface; the Q-Former's attention
    modules are replaced by mmkernels.nn.QFormerAttention, which transformers' output recorder
    would not hook (it matches Blip2QFormerMultiHeadAttention): patch mirrors its hooks."""
    torch.manual_seed(0)
    model = _blip2()
    eager = _eager_twin(model)
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)
    ids = torch.randint(0, 60, (2, 9), device=DEVICE)
    ids[:, :4] = 63
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0

    def run(m):
        v = m.vision_model(pixel_values=pix, output_attentions=True, output_hidden_states=True)
        q = m.qformer(query_embeds=m.query_tokens.expand(2, -1, -1), encoder_hidden_states=v.last_hidden_state,
                      output_attentions=True, output_hidden_states=True)
        lm = m(input_ids=ids, attention_mask=mask, pixel_values=pix, output_attentions=True).language_model_outputs
        return v, q, lm

    with torch.no_grad():
        ref = run(eager)
        if hooks_first:
            run(model)  # transformers installs its recording hooks on the original modules
    report = mk.patch(model)
    assert any(new.endswith("QFormerAttention") for _, _, new in report.replaced), str(report)
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        v, q, lm = run(model)
    _assert_same("vision attentions", v.attentions, ref[0].attentions, 2, (2, 2, 17, 17))
    _assert_same("vision hidden_states", v.hidden_states, ref[0].hidden_states, 3)
    # transformers records the Q-Former's self and cross attentions under "attentions" (its
    # layer_name ".attention" also matches ".crossattention.attention"), cross ones once more
    _assert_same("qformer attentions", q.attentions, ref[1].attentions, 4)
    _assert_same("qformer cross_attentions", q.cross_attentions, ref[1].cross_attentions, 2, (2, 2, 4, 17))
    _assert_same("qformer hidden_states", q.hidden_states, ref[1].hidden_states, 3)
    _assert_same("lm attentions", lm.attentions, ref[2].attentions, 2, (2, 4, 9, 9))
    assert len(_oa_warnings(record)) == 1, [str(w.message) for w in record]
    # unpatched and switched to eager, the original Q-Former modules record again (transformers
    # installs its hooks once: if that happened while patched, unpatch gives them theirs)
    mk.unpatch(model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        q2 = run(model)[1]
    _assert_same("unpatched qformer attentions", q2.attentions, ref[1].attentions, 4)
    _assert_same("unpatched qformer cross_attentions", q2.cross_attentions, ref[1].cross_attentions, 2)


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("family", ["clip", "qwen2_vl_text"])
def test_retain_grad_hidden_states_attentions(family):
    """transformers' test_retain_grad_hidden_states_attentions on the patched model (train mode,
    dropout 0), plus input gradients equal to the eager model's."""
    torch.manual_seed(0)
    if family == "clip":
        model = _clip()
        x = torch.randn(2, 3, 16, 16, device=DEVICE)
        call = lambda m, x: m(pixel_values=x, output_attentions=True, output_hidden_states=True)  # noqa: E731
    else:
        model = _qwen2_vl_text()
        x = torch.randn(2, 7, 32, device=DEVICE)
        call = lambda m, x: m(inputs_embeds=x, output_attentions=True, output_hidden_states=True)  # noqa: E731
    eager = _eager_twin(model)
    mk.patch(model)
    grads = []
    for m in (model, eager):
        m.train()
        xi = x.clone().requires_grad_(True)
        out = call(m, xi)
        hidden, attn = out.hidden_states[0], out.attentions[0]
        hidden.retain_grad()
        attn.retain_grad()
        out.last_hidden_state.flatten()[0].backward(retain_graph=True)
        assert hidden.grad is not None and attn.grad is not None
        grads.append((xi.grad, attn.grad))
    assert_close_abs("input grad", grads[0][0], grads[1][0], ATOL)
    assert_close_abs("attentions[0] grad", grads[0][1], grads[1][1], ATOL)
    mk.unpatch(model)


# ----------------------------------------------------------------------------- eager left alone
def test_patch_leaves_user_eager_alone():
    model = _clip(attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    report = mk.patch(model)
    assert model.config._attn_implementation == "eager" and not report.configs
    assert any("eager" in why and "override_eager" in why for _, _, why in report.skipped), str(report)
    mk.unpatch(model)
    report = mk.patch(model, override_eager=True)
    assert model.config._attn_implementation == "mmkernels", str(report)
    mk.unpatch(model)
    assert model.config._attn_implementation == "eager"
    # per sub-config: an eager LM inside a composite model stays eager, its vision tower is patched
    model = _blip2()
    model.set_attn_implementation({"text_config": "eager"})
    report = mk.patch(model)
    impls = {type(m.config).__name__: m.config._attn_implementation for m in model.modules()
             if isinstance(m, transformers.PreTrainedModel)}
    assert impls["LlamaConfig"] == "eager" and impls["Blip2VisionConfig"] == "mmkernels", impls
    mk.unpatch(model)
    assert model.language_model.config._attn_implementation == "eager"
    assert model.vision_model.config._attn_implementation == "sdpa"
