"""Rough inputs that used to crash obscurely, return something wrong or fail late: each now gives
a ``ValueError`` naming the argument (or, where the result is well defined, that result).

* ``mk.attention_scores`` with no keys (Lk = 0: the empty (B, 0) result) or head dim 0 (error);
* ``mk.nn.*.from_hf`` given a module of the wrong type;
* ``mk.nn.TokenPooler`` options, checked at construction instead of at the first forward;
* ``mk.qformer_cross_attention`` with an additive mask passed as a 2-D keep-mask;
* ``mk.FastV`` with ``labels=``: the labels are pruned like the sequence.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs

import mmkernels as mk

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ----------------------------------------------------------------------------- 1. attention_scores
def test_attention_scores_no_keys_and_head_dim_zero():
    q = torch.randn(2, 4, 3, 8, device=DEVICE)
    k = torch.randn(2, 2, 0, 8, device=DEVICE)  # Lk = 0 (and GQA)
    for backend in (None, "reference"):
        s = mk.attention_scores(q, k, enable_gqa=True, query_index=-1, backend=backend)
        assert s.shape == (2, 0) and s.dtype == torch.float32 and not s.requires_grad
    assert mk.attention_scores(q, k, enable_gqa=True, reduce_heads=None).shape == (2, 4, 0)
    assert mk.attention_scores(q.double(), k.double(), enable_gqa=True).dtype == torch.float64
    # the same through mk.attention(..., return_scores=...): zeros for the output, empty scores
    out, s = mk.attention(q, k, k, enable_gqa=True, return_scores=dict(query_index=-1))
    assert s.shape == (2, 0) and out.shape == (2, 4, 3, 8) and not out.abs().any()
    # arguments are still checked when there is nothing to compute
    with pytest.raises(ValueError, match="query_index: 3 is out of range"):
        mk.attention_scores(q, k, enable_gqa=True, query_index=3)
    with pytest.raises(ValueError, match="backend: got 'bogus'"):
        mk.attention_scores(q, k, enable_gqa=True, backend="bogus")
    # head dim 0: no logits and no default scale 1/sqrt(D) (was ZeroDivisionError)
    q0, k0 = torch.randn(2, 4, 3, 0, device=DEVICE), torch.randn(2, 4, 5, 0, device=DEVICE)
    with pytest.raises(ValueError, match=r"query: expected a head dim D >= 1 .*shape=\(2, 4, 3, 0\)"):
        mk.attention_scores(q0, k0)
    with pytest.raises(ValueError, match="query: expected a head dim D >= 1"):
        mk.attention_scores(q0, k0, scale=1.0)


# ----------------------------------------------------------------------------- 2. nn from_hf
FROM_HF = [
    ("QFormerAttention", "module", "Blip2QFormerMultiHeadAttention"),
    ("Gemma3MultiModalProjector", "module", "Gemma3MultiModalProjector"),
    ("LlavaOnevisionPooling", "model", "LLaVA-OneVision model"),
    ("InternVLPixelShuffle", "module", "InternVLMultiModalProjector"),
    ("Idefics3PixelShuffle", "connector", "Idefics3Connector"),
    ("LlavaNextVideoPooler", "pooler", "LlavaNextVideoPooler"),
    ("Qwen2VLPatchMerger", "merger", "PatchMerger"),
]


@pytest.mark.parametrize("cls,arg,expected", FROM_HF, ids=[c for c, _, _ in FROM_HF])
def test_from_hf_wrong_module_raises(cls, arg, expected):
    with pytest.raises(ValueError, match=rf"^{arg}: {cls}\.from_hf expected .*{expected}.*, got Linear"):
        getattr(mk.nn, cls).from_hf(torch.nn.Linear(4, 4))


def test_from_hf_other_models_modules_raise():
    transformers = pytest.importorskip("transformers")
    # another model's attention: CLIP's (q_proj/k_proj/v_proj), BERT's (query/key/value, no attention_dropout)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4))
    with pytest.raises(ValueError, match=r"^module: QFormerAttention\.from_hf .*got CLIPAttention \(.*no \.query"):
        mk.nn.QFormerAttention.from_hf(clip.vision_model.encoder.layers[0].self_attn
                                       if hasattr(clip, "vision_model") else clip.encoder.layers[0].self_attn)
    from transformers.models.bert.modeling_bert import BertSelfAttention

    bert = BertSelfAttention(transformers.BertConfig(hidden_size=32, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"got BertSelfAttention \(no \.attention_dropout\)"):
        mk.nn.QFormerAttention.from_hf(bert)
    # the wrapper instead of the multi-head attention inside it: the message points at the child
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerAttention

    cfg = transformers.Blip2QFormerConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                          encoder_hidden_size=24)
    wrapper = Blip2QFormerAttention(cfg, is_cross_attention=True)
    with pytest.raises(ValueError, match=r"got Blip2QFormerAttention .*did you mean module\.attention\?"):
        mk.nn.QFormerAttention.from_hf(wrapper)
    assert mk.nn.QFormerAttention.from_hf(wrapper.attention).key is wrapper.attention.key
    # a pooler whose pool is not one of the three HF kinds; a projector without its norm
    bad = torch.nn.Module()
    bad.pool = torch.nn.Identity()
    with pytest.raises(ValueError, match=r"pooler: .*\.pool is not an AvgPool2d, MaxPool2d or Conv2d \(got Identity\)"):
        mk.nn.LlavaNextVideoPooler.from_hf(bad)
    with pytest.raises(ValueError, match=r"module: InternVLPixelShuffle\.from_hf .*not starting with a LayerNorm"):
        mk.nn.InternVLPixelShuffle.from_hf(torch.nn.Sequential(torch.nn.Linear(4, 4)))


# ----------------------------------------------------------------------------- 3. TokenPooler
@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="average"), "mode: expected one of 'avg', 'max', 'bilinear', 'merge', got 'average'"),
    (dict(kernel_size=0), r"kernel_size: expected a positive int or a pair of positive ints, got 0"),
    (dict(kernel_size=(2, 2, 2)), "kernel_size: expected"),
    (dict(stride=-1), "stride: expected a positive int"),
    (dict(mode="merge", stride=3), "stride: mode='merge' uses stride = kernel_size"),
    (dict(mode="bilinear", stride=2), "stride: not used by mode='bilinear'"),
    (dict(output_size=(4, 4)), "output_size: only used by mode='bilinear'"),
    (dict(norm="batchnorm", norm_dim=8), "norm: expected None, 'layernorm' or 'rmsnorm', got 'batchnorm'"),
    (dict(norm="layernorm"), "norm_dim: needed with a norm"),
    (dict(norm="layernorm", norm_dim=0), "norm_dim: expected a positive int"),
    (dict(eps=-1.0), "eps: expected a float >= 0"),
    (dict(keep_cls=True), "keep_cls: keep_cls=True needs has_cls=True"),
    (dict(grid=(3, 0)), "grid: expected a positive int or a pair"),
    (dict(mode="merge", grid=(27, 27)), r"grid: \(h, w\) = \(27, 27\) is not divisible by kernel_size"),
    (dict(kernel_size=5, grid=(4, 4)), r"kernel_size: window \(5, 5\) is larger than the grid"),
    (dict(backend="fast"), "backend: got 'fast'"),
])
def test_token_pooler_validates_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.nn.TokenPooler(**kwargs)


def test_token_pooler_valid_options_still_construct():
    x = torch.randn(2, 1 + 36, 8, device=DEVICE)
    pooler = mk.nn.TokenPooler("avg", 2, grid=(6, 6), has_cls=True, keep_cls=True, norm="rmsnorm", norm_dim=8)
    assert pooler(x).shape == (2, 1 + 9, 8)
    assert mk.nn.TokenPooler("merge", 3, grid=6)(x[:, 1:]).shape == (2, 4, 72)
    assert mk.nn.TokenPooler("bilinear", output_size=(3, 2), backend="reference")(x[:, 1:]).shape == (2, 6, 8)


# ----------------------------------------------------------------------------- 4. Q-Former 2-D masks
def _qformer_args(b=2, lq=4, lk=5, dq=16, dkv=12, a=16):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    return [t(b, lq, dq), t(b, lk, dkv), t(a, dq), t(a), t(a, dkv), t(a), t(a, dkv), t(a), 2]


def test_qformer_2d_additive_mask_raises():
    args = _qformer_args()
    additive = torch.zeros(2, 5, device=DEVICE)
    additive[1, 3:] = -10000.0  # HF's extended-mask values, but 2-D: read as keep-mask it would be inverted
    if additive.device.type == "cpu":  # the value check reads the mask only on the CPU (no device sync)
        with pytest.raises(ValueError, match=r"encoder_attention_mask: a 2-D mask is a keep-mask \(B, Lk\).*"
                                             r"-10000\.0.*additive mask as 4-D \(B or 1, H or 1, Lq or 1, Lk\)"):
            mk.qformer_cross_attention(*args, encoder_attention_mask=additive)
        for bad in (torch.full((1, 5), float("-inf"), device=DEVICE), torch.full((2, 5), 2, device=DEVICE)):
            with pytest.raises(ValueError, match="encoder_attention_mask: a 2-D mask is a keep-mask"):
                mk.qformer_cross_attention(*args, encoder_attention_mask=bad)
        # the nn module's output_attentions (reference) path checks it too
        cfg = type("Cfg", (), dict(hidden_size=16, num_attention_heads=2, encoder_hidden_size=12,
                                   attention_probs_dropout_prob=0.0))()
        layer = mk.nn.QFormerAttention(cfg, is_cross_attention=True).to(DEVICE)
        with pytest.raises(ValueError, match="encoder_attention_mask: a 2-D mask is a keep-mask"):
            layer(args[0], encoder_hidden_states=args[1], encoder_attention_mask=additive, output_attentions=True)
        with pytest.raises(ValueError, match="encoder_attention_mask: a 2-D mask is a keep-mask"):
            layer(args[0], encoder_hidden_states=args[1], encoder_attention_mask=additive)
    # the supported forms: a 0/1 keep-mask (float, int or bool), and the additive mask as 4-D
    keep = (additive == 0)
    ref = mk.qformer_cross_attention(*args, encoder_attention_mask=keep)
    for m in (keep.float(), keep.long(), additive[:, None, None, :]):
        assert_close_abs("mask form", mk.qformer_cross_attention(*args, encoder_attention_mask=m), ref, 1e-5)


# ----------------------------------------------------------------------------- 5. FastV with labels
def test_fastv_labels_are_pruned_with_the_sequence():
    pytest.importorskip("transformers")
    from test_prune import _fastv_reference, _llava_inputs, _tiny_llava

    from mmkernels.integrations.prune import kept_index

    torch.manual_seed(0)
    model = _tiny_llava()
    inputs = _llava_inputs()
    visual = inputs["input_ids"] == 63
    labels = inputs["input_ids"].masked_fill(visual | (inputs["attention_mask"] == 0), -100)  # LLaVA-style
    labels[1, :4] = -100  # nor the first real token of the left-padded row (a padding logit predicts it)
    labels_before = labels.clone()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    index, ref_logits, _ = _fastv_reference(ref, ref.model.language_model.layers, 2, 0.5, inputs, visual)
    mk.patch(model, prune=mk.FastV(layer=2, keep=0.5))
    with torch.no_grad():
        out = model(**inputs, labels=labels)
    index = kept_index(model)
    rows = torch.arange(index.shape[0], device=index.device)[:, None]
    assert out.logits.shape[1] == index.shape[1] < labels.shape[1]
    assert torch.equal(labels, labels_before)  # the caller's tensor is not modified
    kept = labels[rows, index]
    # the loss HF computes = next-token cross-entropy over the pruned sequence, labels at the kept positions
    ce = torch.nn.functional.cross_entropy
    expected = ce(out.logits[:, :-1].flatten(0, 1).float(), kept[:, 1:].flatten(), ignore_index=-100)
    assert torch.isfinite(out.loss) and abs(float(out.loss) - float(expected)) < 1e-5
    # ... and the eager FastV reference's logits at the kept positions give the same loss
    ref_loss = ce(ref_logits[rows, index][:, :-1].flatten(0, 1).float(), kept[:, 1:].flatten(), ignore_index=-100)
    assert abs(float(out.loss) - float(ref_loss)) < 1e-4
    # shift_labels: the same positions dropped (each kept logit keeps its own target)
    shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        out2 = model(**inputs, labels=labels, shift_labels=shift)
    expected2 = ce(out2.logits.flatten(0, 1).float(), shift[rows, index].flatten(), ignore_index=-100)
    assert abs(float(out2.loss) - float(expected2)) < 1e-5
    # without image tokens nothing is pruned and the labels are used as given
    text = dict(inputs, input_ids=inputs["input_ids"].masked_fill(visual, 5))
    text.pop("pixel_values")
    with torch.no_grad():
        out3 = model(**text, labels=labels)
    assert out3.logits.shape[1] == labels.shape[1] and torch.isfinite(out3.loss)
    mk.unpatch(model)
