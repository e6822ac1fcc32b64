"""Token-pooling modules: ``TokenPooler`` and the drop-ins, each against the real transformers
class it replaces (tiny configs, random weights, no downloads), forward and gradients in fp32
on the Triton path (interpreter on CPU)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs, poisoned

import mmkernels as mk
from mmkernels.reference.token_pool import token_pool as ref_token_pool

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=100)
TINY_VISION = dict(hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)


def _randomize(module: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Random parameters (HF initialises norm weights to 0/1, which would hide a misplaced weight)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if p.dim() == 1 else 0.0))
    return module.to(DEVICE)


def compare(hf_fn, mk_fn, x, params=(), atol=2e-5):
    """Same input to both; compare the outputs and the grads of x and of the (shared) params."""
    x_hf = x.clone().requires_grad_()
    x_mk = x.clone().requires_grad_()
    out_hf = hf_fn(x_hf)
    with poisoned(), mk.use_backend("triton"):
        out_mk = mk_fn(x_mk)
    assert out_mk.shape == out_hf.shape and out_mk.dtype == out_hf.dtype
    assert_close_abs("out", out_mk, out_hf, atol)
    do = torch.randn_like(out_hf)
    params = list(params)
    g_hf = torch.autograd.grad(out_hf, [x_hf] + params, do)
    with poisoned(), mk.use_backend("triton"):
        g_mk = torch.autograd.grad(out_mk, [x_mk] + params, do)
    for i, (a, b) in enumerate(zip(g_mk, g_hf)):
        assert_close_abs("dx" if i == 0 else f"dparam{i}", a, b, atol * 4)


# ----------------------------------------------------------------------------- Gemma 3
def test_gemma3_projector():
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector as HFProjector

    cfg = Gemma3Config(vision_config=dict(TINY_VISION, hidden_size=48, image_size=64, patch_size=4),
                       text_config=TINY_TEXT, mm_tokens_per_image=16)
    hf = _randomize(HFProjector(cfg))  # 16×16 patches → 4×4 tokens: avg 4×4 + RMSNorm(1 + w)
    fast = mk.nn.Gemma3MultiModalProjector.from_hf(hf)
    assert fast.mm_soft_emb_norm.weight is hf.mm_soft_emb_norm.weight
    assert fast.mm_input_projection_weight is hf.mm_input_projection_weight
    assert fast.state_dict().keys() == hf.state_dict().keys()
    x = torch.randn(2, 256, 48, device=DEVICE)
    compare(hf, fast, x, [hf.mm_soft_emb_norm.weight, hf.mm_input_projection_weight])
    fresh = mk.nn.Gemma3MultiModalProjector.from_config(cfg)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert fresh.kernel_size == hf.kernel_size and fresh.mm_soft_emb_norm.eps == hf.mm_soft_emb_norm.eps


def test_gemma3_projector_bf16_close_to_hf():
    """bf16: the fused path rounds once (HF rounds the pooled tensor first): within bf16 noise."""
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector as HFProjector

    cfg = Gemma3Config(vision_config=dict(TINY_VISION, hidden_size=48, image_size=32, patch_size=4),
                       text_config=TINY_TEXT, mm_tokens_per_image=4)
    hf = _randomize(HFProjector(cfg)).to(torch.bfloat16)
    fast = mk.nn.Gemma3MultiModalProjector.from_hf(hf)
    x = torch.randn(2, 64, 48, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad(), mk.use_backend("triton"):
        exact = copy.deepcopy(hf).float()(x.float())
        err_hf = (hf(x).float() - exact).abs().max()
        err_mk = (fast(x).float() - exact).abs().max()
    assert err_mk <= 2 * err_hf + 1e-2, f"fused bf16 error {err_mk:.3g} vs HF bf16 error {err_hf:.3g}"


# ----------------------------------------------------------------------------- LLaVA-OneVision
def test_llava_onevision_apply_pooling():
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    cfg = LlavaOnevisionConfig(vision_config=dict(TINY_VISION, image_size=54, patch_size=2),
                               text_config=dict(TINY_TEXT, model_type="qwen2"))
    owner = SimpleNamespace(config=cfg)  # apply_pooling reads only self.config
    fast = mk.nn.LlavaOnevisionPooling.from_hf(owner)
    x = torch.randn(2, 27 * 27, 24, device=DEVICE)  # 27×27 → 14×14
    compare(lambda t: LlavaOnevisionModel.apply_pooling(owner, t), fast, x)
    assert fast(x).shape == (2, 196, 24)


# ----------------------------------------------------------------------------- InternVL
@pytest.mark.parametrize("has_cls", [False, True], ids=["grid", "cls"])
def test_internvl_pixel_shuffle_layer_norm(has_cls):
    from transformers import InternVLConfig
    from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

    cfg = InternVLConfig(vision_config=TINY_VISION, text_config=dict(TINY_TEXT, model_type="qwen2"))
    proj = _randomize(InternVLMultiModalProjector(cfg))
    fast = mk.nn.InternVLPixelShuffle.from_hf(proj, downsample_ratio=cfg.downsample_ratio, has_cls=has_cls)
    assert fast.layer_norm is proj.layer_norm

    def hf_chain(t):  # InternVLModel.get_image_features between the vision tower and linear_1
        if has_cls:
            t = t[:, 1:, :]
        b, n, c = t.shape
        side = int(n ** 0.5)
        t = InternVLModel.pixel_shuffle(None, t.reshape(b, side, side, c), scale_factor=cfg.downsample_ratio)
        return proj.layer_norm(t.reshape(b, -1, t.shape[-1]))

    x = torch.randn(2, int(has_cls) + 10 * 10, 24, device=DEVICE)
    compare(hf_chain, fast, x, [proj.layer_norm.weight, proj.layer_norm.bias])
    # the original remote-code layout: mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)
    mlp1 = torch.nn.Sequential(proj.layer_norm, proj.linear_1, torch.nn.GELU(), proj.linear_2)
    assert mk.nn.InternVLPixelShuffle.from_hf(mlp1).layer_norm is proj.layer_norm


# ----------------------------------------------------------------------------- Idefics3 / SmolVLM
@pytest.mark.parametrize("family,scale", [("idefics3", 2), ("smolvlm", 3)])
def test_idefics3_smolvlm_pixel_shuffle(family, scale):
    if family == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector as Connector
    else:
        from transformers import SmolVLMConfig as Config
        from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector as Connector
    cfg = Config(vision_config=TINY_VISION, text_config=TINY_TEXT, scale_factor=scale)
    conn = _randomize(Connector(cfg))
    fast = mk.nn.Idefics3PixelShuffle.from_hf(conn)
    x = torch.randn(2, (4 * scale) ** 2, 24, device=DEVICE)
    compare(lambda t: conn.pixel_shuffle(t, conn.scale_factor), fast, x)


# ----------------------------------------------------------------------------- LLaVA-NeXT-Video
@pytest.mark.parametrize("mode", ["average", "max", "conv"])
def test_llava_next_video_pooler(mode):
    from transformers import LlavaNextVideoConfig
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler as HFPooler

    cfg = LlavaNextVideoConfig(vision_config=dict(TINY_VISION, image_size=20, patch_size=2), text_config=TINY_TEXT,
                               spatial_pool_mode=mode, spatial_pool_stride=2)
    hf = _randomize(HFPooler(cfg))
    fast = mk.nn.LlavaNextVideoPooler.from_hf(hf)
    assert fast.mode == mode
    if mode == "conv":
        assert fast.pool is hf.pool
    x = torch.randn(3, 10 * 10, 24, device=DEVICE)
    compare(hf, fast, x, list(hf.parameters()))


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen2vl_patch_merger(family):
    if family == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as HFMerger
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger as HFMerger
    hf = _randomize(HFMerger(32, 24, 2))
    fast = mk.nn.Qwen2VLPatchMerger.from_hf(hf)
    assert fast.ln_q is hf.ln_q and fast.mlp is hf.mlp
    assert fast.state_dict().keys() == hf.state_dict().keys()
    x = torch.randn(4 * 7, 24, device=DEVICE)  # 7 merged groups of 2×2 pre-grouped patches
    compare(hf, fast, x, list(hf.ln_q.parameters()))
    norm = "layernorm" if family == "qwen2_vl" else "rmsnorm"
    fresh = mk.nn.Qwen2VLPatchMerger(32, 24, 2, norm=norm)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}


# ----------------------------------------------------------------------------- TokenPooler
def test_token_pooler_module():
    pooler = mk.nn.TokenPooler("merge", 2, has_cls=True, norm="layernorm", norm_dim=96).to(DEVICE)
    assert set(pooler.state_dict()) == {"weight", "bias"}
    _randomize(pooler)
    x = torch.randn(2, 1 + 8 * 6, 24, device=DEVICE)
    expected = ref_token_pool(x, grid=(8, 6), mode="merge", has_cls=True, norm="layernorm",
                              norm_weight=pooler.weight, norm_bias=pooler.bias)
    compare(lambda t: ref_token_pool(t, grid=(8, 6), mode="merge", has_cls=True, norm="layernorm",
                                     norm_weight=pooler.weight, norm_bias=pooler.bias),
            lambda t: pooler(t, grid=(8, 6)), x, [pooler.weight, pooler.bias])
    assert expected.shape == (2, 12, 96)
    rms = mk.nn.TokenPooler("avg", 3, stride=2, norm="rmsnorm", norm_dim=24)
    assert rms.bias is None and "norm='rmsnorm'" in repr(rms)
    assert mk.nn.TokenPooler("bilinear", output_size=(3, 3)).weight is None
    with pytest.raises(ValueError, match="norm_dim"):
        mk.nn.TokenPooler("avg", norm="layernorm")
