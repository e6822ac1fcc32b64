"""Token pruning: ``mk.select_tokens`` / ``gather_tokens`` / ``restore_tokens``, and
``mk.patch(model, prune=...)`` — FastV on tiny random LLaVA and Qwen2-VL language models,
VisionZip on tiny CLIP / SigLIP towers (configs only, no downloads).

The references are eager ``output_attentions=True`` implementations of the same rules written
here, independently of mmkernels: FastV as its attention-mask variant (the full sequence runs,
and layers >= K mask the dropped image tokens as keys), which must give the pruned model's logits
at the kept positions and the same greedy ``generate()`` tokens."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_abs

import mmkernels as mk
from mmkernels.integrations.prune import kept_index

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATOL = 1e-4  # fp32 logits: Triton (interpreter) vs eager differ by summation order only


# ----------------------------------------------------------------------------- select_tokens
def test_select_tokens_order_protection_and_inverse():
    x = torch.arange(2 * 6 * 3, dtype=torch.float32, device=DEVICE).view(2, 6, 3)
    scores = torch.tensor([[9., 1., 7., 3., 8., 2.], [0., 5., 5., 1., 2., 6.]], device=DEVICE)
    kept, index = mk.select_tokens(x, scores, 2, protect=[0])
    assert index.tolist() == [[0, 2, 4], [0, 1, 5]]  # ascending; tie 5/5 broken toward position 1
    assert torch.equal(kept, x[torch.arange(2)[:, None], index])
    # a fraction of the unprotected tokens, FastV's rounding: round(0.5 · 4) = 2
    protect = torch.tensor([True, False, False, False, False, True], device=DEVICE)
    _, index = mk.select_tokens(x, scores, 0.5, protect=protect)
    assert index.tolist() == [[0, 2, 4, 5], [0, 1, 2, 5]]
    back = mk.restore_tokens(kept, mk.select_tokens(x, scores, 2, protect=[0])[1], 6)
    assert torch.equal(back[:, [0, 2, 4]][0], x[0, [0, 2, 4]]) and back[0, 1].abs().sum() == 0
    # the same selection applied to the tensors travelling with the tokens
    pos3 = torch.arange(6, device=DEVICE).expand(3, 2, 6)                          # Qwen2-VL (3, B, L) ids
    assert mk.gather_tokens(pos3, index, -1, batch_dim=1)[2].tolist() == index.tolist()
    cos = torch.randn(1, 6, 4, device=DEVICE)                                      # LLaMA (1, L, D): broadcast
    assert torch.equal(mk.gather_tokens(cos, index, 1)[1], cos[0, index[1]])
    mask = torch.randn(2, 1, 6, 6, device=DEVICE)
    m = mk.gather_tokens(mask, index, (-2, -1))
    assert torch.equal(m[1, 0], mask[1, 0][index[1]][:, index[1]])


def test_select_tokens_bad_input():
    x, s = torch.randn(2, 6, 3, device=DEVICE), torch.randn(2, 6, device=DEVICE)
    for kwargs, msg in [
        (dict(keep=6, protect=[0]), "keep: 6 tokens requested but only 5"),
        (dict(keep=7), "keep: 7"),
        (dict(keep=0.0), "keep: a fraction"),
        (dict(keep=1.5), "keep: a fraction"),
        (dict(keep=True), "keep"),
        (dict(keep=2, protect=[6]), "protect: positions"),
        (dict(keep=2, protect=torch.tensor([[True] + [False] * 5, [True, True] + [False] * 4])), "same number"),
    ]:
        keep = kwargs.pop("keep")
        if isinstance(kwargs.get("protect"), torch.Tensor):
            kwargs["protect"] = kwargs["protect"].to(DEVICE)
        with pytest.raises(ValueError, match=msg):
            mk.select_tokens(x, s, keep, **kwargs)
    with pytest.raises(ValueError, match="scores"):
        mk.select_tokens(x, s[:, :5], 2)
    with pytest.raises(ValueError, match=r"index: values must lie in \[0, 6\)"):
        mk.gather_tokens(x, torch.tensor([[0, 6], [1, 2]], device=DEVICE))
    with pytest.raises(ValueError, match="length"):
        mk.restore_tokens(x, torch.zeros(2, 6, dtype=torch.long, device=DEVICE), 4)


# ----------------------------------------------------------------------------- FastV reference
def _fastv_reference(ref_model, lm_layers, K, keep, inputs, visual, generate_tokens=0):
    """Eager FastV: scores from output_attentions of layer K-1, then the attention-mask variant.
    Returns (kept index (B, n), logits (B, L, V), generated tokens or None)."""
    with torch.no_grad():
        att = ref_model(**inputs, output_attentions=True).attentions[K - 1]    # (B, H, L, L)
    scores = att[:, :, -1, :].mean(1)                                         # last token, head mean
    n_vis = int(visual.sum(1)[0])
    k = int(round(keep * n_vis)) if isinstance(keep, float) else keep
    top = scores.masked_fill(~visual, float("-inf")).topk(k, dim=1).indices
    kept = ~visual
    kept[torch.arange(visual.shape[0])[:, None], top] = True
    index = torch.stack([row.nonzero()[:, 0] for row in kept])
    dropped = ~kept

    def pre(module, args, kwargs):
        am = kwargs["attention_mask"]
        d = torch.nn.functional.pad(dropped, (0, am.shape[-1] - dropped.shape[1]))
        kwargs["attention_mask"] = am.masked_fill(d[:, None, None, :], torch.finfo(am.dtype).min)
        return args, kwargs

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in lm_layers[K:]]
    try:
        with torch.no_grad():
            logits = ref_model(**inputs).logits
            gen = (ref_model.generate(**inputs, max_new_tokens=generate_tokens, do_sample=False)
                   if generate_tokens else None)
    finally:
        for h in handles:
            h.remove()
    return index, logits, gen


TINY_LLAMA = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                  pad_token_id=0)
TINY_CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)


def _tiny_llava():
    cfg = transformers.LlavaConfig(vision_config=TINY_CLIP, text_config=TINY_LLAMA, image_token_index=63,
                                   vision_feature_layer=-1, image_seq_length=16)
    return transformers.LlavaForConditionalGeneration(cfg).to(DEVICE).eval()


def _llava_inputs(left_pad=3):
    ids = torch.randint(1, 60, (2, 22), device=DEVICE)
    ids[:, left_pad + 1:left_pad + 17] = 63  # 16 image tokens after a text token
    mask = torch.ones_like(ids)
    mask[1, :left_pad] = 0
    ids[1, :left_pad] = 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 16, 16, device=DEVICE))


def _check_fastv(model, lm_layers, inputs, visual, K, keep, generate_tokens):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    index, ref_logits, ref_gen = _fastv_reference(ref, ref.model.language_model.layers, K, keep, inputs, visual,
                                                  generate_tokens)
    report = mk.patch(model, prune=mk.FastV(layer=K, keep=keep))
    assert "FastV" in str(report)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(kept_index(model), index.to(DEVICE)), (kept_index(model), index)
    assert logits.shape[1] == index.shape[1] < visual.shape[1]
    rows = torch.arange(index.shape[0])[:, None]
    ref_kept = ref_logits[rows, index]
    if "attention_mask" in inputs:  # padding rows: all keys masked, eager gives a uniform row, mmkernels 0
        real = inputs["attention_mask"][rows, index].bool()
        logits, ref_kept = logits[real], ref_kept[real]
    assert_close_abs("pruned logits", logits, ref_kept, ATOL)
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=generate_tokens, do_sample=False)
    assert torch.equal(gen, ref_gen), (gen, ref_gen)
    # unpatch removes every hook: the full sequence comes back
    mk.unpatch(model)
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == visual.shape[1]
    assert kept_index(model) is None


def test_fastv_llava_matches_eager_rule():
    model = _tiny_llava()
    inputs = _llava_inputs()
    _check_fastv(model, model.model.language_model.layers, inputs, inputs["input_ids"] == 63, K=2, keep=0.5,
                 generate_tokens=3)


def _tiny_qwen2_vl():
    cfg = transformers.Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64,
                         rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])),
        image_token_id=60, video_token_id=61, vision_start_token_id=62)
    return transformers.Qwen2VLForConditionalGeneration(cfg).to(DEVICE).eval()


def test_fastv_qwen2_vl_matches_eager_rule():
    model = _tiny_qwen2_vl()
    ids = torch.randint(0, 59, (2, 15), device=DEVICE)
    ids[:, 3], ids[:, 4:10] = 62, 60                         # vision start, then 6 image tokens (4×6 patches / 2×2)
    inputs = dict(input_ids=ids, pixel_values=torch.randn(48, 24, device=DEVICE),
                  image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 6]], device=DEVICE),
                  mm_token_type_ids=(ids == 60).int())
    _check_fastv(model, model.model.language_model.layers, inputs, ids == 60, K=2, keep=3, generate_tokens=2)


def test_fastv_bad_input_raises():
    with pytest.raises(ValueError, match="FastV.layer"):
        mk.FastV(layer=0)
    with pytest.raises(ValueError, match="FastV.keep"):
        mk.FastV(keep=1.5)
    model = _tiny_llava()
    with pytest.raises(ValueError, match="below the number of decoder layers"):
        mk.patch(model, prune=mk.FastV(layer=3))
    assert not mk.integrations.is_patched(model)
    with pytest.raises(ValueError, match="must run on mmkernels"):
        mk.patch(model, attention=False, prune=mk.FastV())
    with pytest.raises(ValueError, match="prune: expected"):
        mk.patch(model, prune="fastv")
    mk.patch(model, prune=mk.FastV(layer=1, keep=17))
    inputs = _llava_inputs(left_pad=0)
    with pytest.raises(ValueError, match="17 image tokens requested"), torch.no_grad():
        model(**inputs)
    mk.unpatch(model)
    mk.patch(model, prune=mk.FastV(layer=1))
    right = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
    right["attention_mask"][1, -2:] = 0
    with pytest.raises(ValueError, match="pad batched prompts on the left"), torch.no_grad():
        model(**right)
    uneven = dict(inputs, input_ids=inputs["input_ids"].clone())
    uneven["input_ids"][0, -1] = 63
    with pytest.raises(ValueError):  # HF or FastV refuses: 17 image tokens in one sample, 16 in the other
        model(**uneven)


# ----------------------------------------------------------------------------- VisionZip
def _visionzip_reference(hidden, attn, keys, dominant, contextual, has_cls):
    """VisionZip's rule, one sample at a time: hidden (B, L, C) the layer output, attn (B, H, L, L)
    eager weights, keys (B, L, d) the layer's keys averaged over heads."""
    out = []
    for b in range(hidden.shape[0]):
        length = hidden.shape[1]
        a = attn[b].sum(0)
        if has_cls:
            s = a[0]
            order = sorted(range(1, length), key=lambda j: (-float(s[j]), j))[: dominant - 1]
            dom = sorted([0] + order)
        else:
            s = a.mean(0)
            dom = sorted(sorted(range(length), key=lambda j: (-float(s[j]), j))[:dominant])
        rest = [j for j in range(length) if j not in dom]
        step = max(1, len(rest) // contextual)
        targets = list(range(0, len(rest), step))[:contextual]
        km = torch.nn.functional.normalize(keys[b, rest], dim=-1)
        groups = {t: [] for t in targets}
        for i in range(len(rest)):
            if i not in targets:
                groups[targets[int((km[targets] @ km[i]).argmax())]].append(rest[i])
        ctx = [hidden[b, rest[t]] + (hidden[b, g].mean(0) if g else 0) for t, g in groups.items()]
        out.append(torch.cat([hidden[b, dom], torch.stack(ctx)]))
    return torch.stack(out)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_visionzip_tower_matches_eager_rule(family):
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=2)
    if family == "clip":
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**common))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
    model = model.to(DEVICE).eval()
    pix = torch.randn(2, 3, 16, 16, device=DEVICE)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        o = ref(pixel_values=pix, output_attentions=True, output_hidden_states=True)
        tower = getattr(ref, "vision_model", ref)  # transformers < 5 nests the transformer
        layer0 = tower.encoder.layers[0]
        k = layer0.self_attn.k_proj(layer0.layer_norm1(o.hidden_states[0]))
        keys = k.view(*k.shape[:2], 2, -1).mean(2)
        reduced = _visionzip_reference(o.hidden_states[1], o.attentions[0], keys, 9, 4, family == "clip")
        expected = tower.encoder.layers[1](reduced, None)
        if family == "siglip":
            expected = tower.post_layernorm(expected)
    report = mk.patch(model, prune=mk.VisionZip(dominant=9, contextual=4, layer=0))
    assert "VisionZip" in str(report)
    with torch.no_grad():
        got = model(pixel_values=pix).last_hidden_state
    assert got.shape == (2, 13, 32)
    assert_close_abs("VisionZip output", got, expected, ATOL)
    with torch.no_grad():  # a deep copy prunes with its own modules
        assert torch.equal(copy.deepcopy(model)(pixel_values=pix).last_hidden_state, got)
    mk.unpatch(model)
    with torch.no_grad():
        assert model(pixel_values=pix).last_hidden_state.shape[1] == o.hidden_states[0].shape[1]


def test_visionzip_bad_input_raises():
    with pytest.raises(ValueError, match="VisionZip"):
        mk.VisionZip(dominant=0)
    with pytest.raises(ValueError, match="out of range for 1 encoder layers"):
        mk.patch(_tiny_llava(), prune=mk.VisionZip())
    next_cfg = transformers.LlavaNextConfig(vision_config=TINY_CLIP, text_config=TINY_LLAMA, image_token_index=63)
    with pytest.raises(ValueError, match="patch grid"):
        mk.patch(transformers.LlavaNextForConditionalGeneration(next_cfg), prune=mk.VisionZip(layer=0))
    with pytest.raises(ValueError, match="runs after the layer LLaVA reads"):  # features read before pruning
        mk.patch(_tiny_llava_2layer_tower(), prune=mk.VisionZip(dominant=5, contextual=3, layer=-1))
    llava = _tiny_llava_2layer_tower()
    mk.patch(llava, prune=mk.VisionZip(dominant=5, contextual=3))
    ids = torch.randint(1, 60, (2, 40), device=DEVICE)
    ids[0, 2:34], ids[1, 2:18] = 63, 63                   # 2 images in sample 0, 1 in sample 1
    with pytest.raises(ValueError, match="same number of images"), torch.no_grad():
        llava(input_ids=ids, pixel_values=torch.randn(3, 3, 16, 16, device=DEVICE))
    ids[0, 33] = 1                                        # 31 + 16 placeholders for 3 images
    with pytest.raises(ValueError, match="the same number per image"), torch.no_grad():
        llava(input_ids=ids, pixel_values=torch.randn(3, 3, 16, 16, device=DEVICE))
    tower = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=8,
        patch_size=4)).to(DEVICE).eval()
    mk.patch(tower, prune=mk.VisionZip(dominant=4, contextual=2, layer=0))  # 5 tokens < 6
    with pytest.raises(ValueError, match="exceeds the 5 tokens"), torch.no_grad():
        tower(pixel_values=torch.randn(1, 3, 8, 8, device=DEVICE))


def _tiny_llava_2layer_tower():
    """LLaVA-1.5's layout: features from the tower's second-to-last layer (vision_feature_layer=-2,
    the layer VisionZip prunes by default), CLS dropped ("default" strategy)."""
    cfg = transformers.LlavaConfig(vision_config=dict(TINY_CLIP, num_hidden_layers=2), text_config=TINY_LLAMA,
                                   image_token_index=63, vision_feature_layer=-2, image_seq_length=16)
    return transformers.LlavaForConditionalGeneration(cfg).to(DEVICE).eval()


def test_visionzip_inside_llava_reduces_placeholders():
    """VisionZip in LLaVA's CLIP tower: the prompt's 16 placeholders per image become
    dominant + contextual (the first of each image's run), with the attention mask and labels; the
    language model then runs exactly as an unpatched LLaVA given that shorter prompt and the reduced
    features, in forward (loss included) and generate(), which returns the caller's prompt."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    model = _tiny_llava_2layer_tower()
    ref = copy.deepcopy(model)
    inputs = _llava_inputs()                                  # 2 images, 16 placeholders each, row 1 left-padded
    ids, ids_before = inputs["input_ids"], inputs["input_ids"].clone()
    labels = ids.masked_fill(ids == 63, -100).masked_fill(inputs["attention_mask"] == 0, -100)
    report = mk.patch(model, prune=mk.VisionZip(dominant=5, contextual=3))
    assert "placeholders reduced" in str(report)
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, labels=labels)
        feats = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output
    h.remove()
    index = kept_index(model)
    rows = torch.arange(2)[:, None]
    red_ids, red_mask = ids[rows, index], inputs["attention_mask"][rows, index]
    assert [f.shape[0] for f in feats] == [8, 8] and (red_ids == 63).sum(1).tolist() == [8, 8]
    assert seen == [22 - 8] and out.logits.shape == (2, 14, 64) and torch.isfinite(out.loss)
    assert torch.equal(red_ids[:, 4:12], torch.full((2, 8), 63, device=DEVICE))  # the first 8 of each run
    assert torch.equal(ids, ids_before)                                            # the caller's tensors untouched
    enc = {"image": BaseModelOutputWithPooling(pooler_output=feats)}
    with torch.no_grad():
        expected = ref(input_ids=red_ids, attention_mask=red_mask, mm_encoder_outputs=enc, labels=labels[rows, index])
        gen = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             pixel_values=inputs["pixel_values"], max_new_tokens=3, do_sample=False)
        ref_gen = ref.generate(input_ids=red_ids, attention_mask=red_mask, mm_encoder_outputs=enc, max_new_tokens=3,
                               do_sample=False)
    real = red_mask.bool()
    assert_close_abs("VisionZip LLaVA logits", out.logits[real], expected.logits[real], ATOL)
    assert abs(float(out.loss) - float(expected.loss)) < ATOL
    assert torch.equal(gen[:, :22], ids) and torch.equal(gen[:, 22:], ref_gen[:, 14:]), (gen, ref_gen)
    # a prompt already written with dominant + contextual placeholders per image is used as is
    with torch.no_grad():
        again = model(input_ids=red_ids, attention_mask=red_mask, pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(again, out.logits)
    mk.unpatch(model)
    assert "generate" not in model.__dict__
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] == 22


def test_visionzip_inside_llava_keeping_every_token_is_the_unpatched_model():
    model = _tiny_llava_2layer_tower()
    ref = copy.deepcopy(model)
    inputs = _llava_inputs()
    mk.patch(model, prune=mk.VisionZip(dominant=16, contextual=0))  # CLS + all 16 patches, in order
    with torch.no_grad():
        got, expected = model(**inputs).logits, ref(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        ref_gen = ref.generate(**inputs, max_new_tokens=3, do_sample=False)
    real = inputs["attention_mask"].bool()
    assert_close_abs("VisionZip keep-all logits", got[real], expected[real], ATOL)
    assert torch.equal(gen, ref_gen)


def test_fastv_static_cache_and_compiled_generate():
    """FastV with ``cache_implementation="static"``: the scoring layer's keys cover the cache's
    max_cache_len slots, and layers >= K write the kept tokens to slots 0..n-1, so their masks are
    rearranged and the free slots masked; decode steps compile with fullgraph=True and without a
    recompile per step.  Same greedy tokens as the dynamic cache."""
    model = _tiny_llava()
    inputs = _llava_inputs()
    mk.patch(model, prune=mk.FastV(layer=1, keep=0.5))
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic), (static, dynamic)
    torch._dynamo.reset()
    cc = transformers.CompileConfig(backend="aot_eager", fullgraph=True)
    cc._compile_all_devices = True  # transformers auto-compiles decode steps on GPUs only otherwise
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled = model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static",
                                  compile_config=cc)
    torch._dynamo.reset()
    assert torch.equal(compiled, dynamic), (compiled, dynamic)
    # Qwen2-VL (M-RoPE positions continue from the unpruned length): static == dynamic
    model = _tiny_qwen2_vl()
    ids = torch.randint(0, 59, (2, 15), device=DEVICE)
    ids[:, 3], ids[:, 4:10] = 62, 60
    inputs = dict(input_ids=ids, pixel_values=torch.randn(48, 24, device=DEVICE),
                  image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 6]], device=DEVICE),
                  mm_token_type_ids=(ids == 60).int())
    mk.patch(model, prune=mk.FastV(layer=1, keep=0.5))
    with torch.no_grad():
        dynamic = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        static = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic), (static, dynamic)


@pytest.mark.parametrize("family,lm", [("LlavaNext", "llama"), ("LlavaOnevision", "qwen2")])
def test_fastv_llava_next_and_onevision_language_models(family, lm):
    """The hooks on LLaVA-NeXT / LLaVA-OneVision (LLaMA and Qwen2 LMs); the image placeholders are
    fed as tokens (no pixels: anyres tiling is the vision side's business, FastV sees only ids)."""
    text = dict(TINY_LLAMA, model_type=lm)
    cfg = getattr(transformers, f"{family}Config")(vision_config=TINY_CLIP, text_config=text, image_token_index=63)
    model = getattr(transformers, f"{family}ForConditionalGeneration")(cfg).to(DEVICE).eval()
    ids = torch.randint(1, 60, (1, 19), device=DEVICE)
    ids[0, 2:14] = 63
    _check_fastv(model, model.model.language_model.layers, dict(input_ids=ids), ids == 63, K=1, keep=0.25,
                 generate_tokens=2)
