"""mk.nn.QFormerAttention against HF's own Blip2/InstructBlip Q-Former attention modules
(built from configs with random weights — no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, assert_close_rule

import mmkernels as mk

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[hf])")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _hf_classes():
    out = {}
    try:
        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention

        out["blip2"] = (transformers.Blip2QFormerConfig, Blip2QFormerMultiHeadAttention)
    except (ImportError, AttributeError):
        pass
    try:
        from transformers.models.instructblip.modeling_instructblip import InstructBlipQFormerMultiHeadAttention

        out["instructblip"] = (transformers.InstructBlipQFormerConfig, InstructBlipQFormerMultiHeadAttention)
    except (ImportError, AttributeError):
        pass
    return out


CLASSES = _hf_classes()


def _hf_module(kind, cross, hidden=96, heads=3, enc=72, dropout=0.0):
    if kind not in CLASSES:
        pytest.skip(f"transformers {transformers.__version__} has no {kind} Q-Former attention")
    config_cls, module_cls = CLASSES[kind]
    config = config_cls(hidden_size=hidden, num_attention_heads=heads, encoder_hidden_size=enc,
                        attention_probs_dropout_prob=dropout)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = module_cls(config, is_cross_attention=cross).to(DEVICE)
    for name, p in module.named_parameters():  # HF's init leaves biases at 0; random biases test more
        # weights ~ 1/sqrt(fan_in): logits of order 1, as in a trained model (std 0.2 at width
        # 1408 would give logits of ~40 and a one-hot softmax)
        torch.nn.init.normal_(p, std=0.2 if name.endswith("bias") else p.shape[1] ** -0.5)
    return module.eval()


def _run(module, x, mask, enc=None, enc_mask=None):
    x = x.detach().clone().requires_grad_()
    enc = None if enc is None else enc.detach().clone().requires_grad_()
    out, _ = module(x, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
    leaves = [x] + ([enc] if enc is not None else []) + list(module.parameters())
    do = torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1], device=out.device)
    return out, torch.autograd.grad(out, leaves, do)


def _compare(hf, x, mask=None, enc=None, enc_mask=None):
    """Ours (fp32, Triton path) vs HF in float64, by the 2x rule against HF in fp32."""
    hf64 = copy.deepcopy(hf).double()
    cast = (lambda t, dt: None if t is None else (t.to(dt) if t.dtype != torch.bool else t))
    out64, g64 = _run(hf64, x.double(), cast(mask, torch.float64), cast(enc, torch.float64), cast(enc_mask, torch.float64))
    out32, g32 = _run(hf, x, mask, enc, enc_mask)
    ours = mk.nn.QFormerAttention.from_hf(hf, backend="triton")
    out, g = _run(ours, x, mask, enc, enc_mask)
    assert_close_rule("out", out, out64, out32)
    scale = max(float(t.abs().max()) for t in g64)
    names = ["d_hidden"] + (["d_encoder"] if enc is not None else []) + [n for n, _ in hf.named_parameters()]
    for name, a, r64, r32 in zip(names, g, g64, g32):
        if name == "key.bias":  # exactly 0 in exact arithmetic (softmax shift invariance)
            assert float(a.abs().max()) <= 1e-4 * scale, float(a.abs().max())
            continue
        assert_close_rule(name, a, r64, r32)


@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_cross_attention_matches_hf(kind):
    hf = _hf_module(kind, cross=True)
    x = torch.randn(2, 32, 96, device=DEVICE)
    enc = torch.randn(2, 57, 72, device=DEVICE)
    keep = torch.rand(2, 57, device=DEVICE) > 0.2
    ext = (1.0 - keep.float())[:, None, None, :] * torch.finfo(torch.float32).min  # what the HF model passes
    _compare(hf, x, enc=enc, enc_mask=ext)
    _compare(hf, x, enc=enc)


def test_cross_attention_real_width():
    hf = _hf_module("blip2", cross=True, hidden=768, heads=12, enc=1408)
    _compare(hf, torch.randn(1, 32, 768, device=DEVICE), enc=torch.randn(1, 257, 1408, device=DEVICE))


def test_cross_attention_kv_batch_broadcast():
    hf = _hf_module("blip2", cross=True)
    _compare(hf, torch.randn(3, 32, 96, device=DEVICE), enc=torch.randn(1, 40, 72, device=DEVICE))


@pytest.mark.parametrize("kind", ["blip2", "instructblip"])
def test_self_attention_matches_hf_with_text_padding(kind):
    hf = _hf_module(kind, cross=False)
    lq = 32 + 13  # InstructBLIP: 32 query tokens + text tokens
    x = torch.randn(2, lq, 96, device=DEVICE)
    keep = torch.ones(2, lq, dtype=torch.bool, device=DEVICE)
    keep[1, -5:] = False  # right-padded instruction
    ext = (1.0 - keep.float())[:, None, None, :] * torch.finfo(torch.float32).min
    _compare(hf, x, mask=ext)


def test_state_dict_and_fresh_construction():
    hf = _hf_module("blip2", cross=True)
    ours = mk.nn.QFormerAttention(hf.config, is_cross_attention=True).to(DEVICE)
    assert list(ours.state_dict().keys()) == list(hf.state_dict().keys())
    ours.load_state_dict(hf.state_dict())
    x, enc = torch.randn(2, 8, 96, device=DEVICE), torch.randn(2, 11, 72, device=DEVICE)
    with torch.no_grad():
        assert_close_abs("fresh module", ours.eval()(x, encoder_hidden_states=enc)[0],
                         hf(x, encoder_hidden_states=enc)[0], 1e-5)
    shared = mk.nn.QFormerAttention.from_hf(hf)
    assert shared.query.weight is hf.query.weight and shared.value.bias is hf.value.bias
    hf.load_state_dict(shared.state_dict())


def test_output_attentions_uses_reference_path():
    hf = _hf_module("blip2", cross=True)
    ours = mk.nn.QFormerAttention.from_hf(hf)
    x, enc = torch.randn(2, 8, 96, device=DEVICE), torch.randn(2, 11, 72, device=DEVICE)
    with torch.no_grad():
        out_hf, w_hf = hf(x, encoder_hidden_states=enc)
        out, w = ours(x, encoder_hidden_states=enc, output_attentions=True)
        _, none = ours(x, encoder_hidden_states=enc)
    assert none is None
    assert_close_abs("weights", w, w_hf, 1e-6)
    assert_close_abs("out", out, out_hf, 1e-5)


def test_dropout_only_in_training_and_reproducible():
    hf = _hf_module("blip2", cross=True, dropout=0.3)
    ours = mk.nn.QFormerAttention.from_hf(hf)
    x, enc = torch.randn(2, 8, 96, device=DEVICE), torch.randn(2, 11, 72, device=DEVICE)
    with torch.no_grad():
        ev = ours.eval()(x, encoder_hidden_states=enc)[0]
        assert_close_abs("eval", ev, hf(x, encoder_hidden_states=enc)[0], 1e-5)
        ours.train()
        torch.manual_seed(3)
        a = ours(x, encoder_hidden_states=enc)[0]
        torch.manual_seed(3)
        b = ours(x, encoder_hidden_states=enc)[0]
    assert torch.equal(a, b) and not torch.allclose(a, ev)
