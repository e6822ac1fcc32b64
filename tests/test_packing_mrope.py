"""Padding-free packing for M-RoPE models (issue 18 item 3): a packed row of three multimodal
samples through a tiny Qwen2.5-VL with ``attn_implementation="mmkernels"`` equals the padded batch,
loss and every gradient; each LM layer runs one ``attention_varlen`` call; the packed LM compiles
with ``fullgraph=True`` (no host read)."""

from __future__ import annotations

import pytest
import torch

import mmkernels as mk
from mmkernels import dispatch
from mmkernels.integrations.qwen_vl import enable_mrope_packing, mrope_packed_cu_seqlens

transformers = pytest.importorskip("transformers")

IMAGE, VSTART, VEND, VOCAB = 60, 61, 62, 64


def _model():
    cls = getattr(transformers, "Qwen2_5_VLForConditionalGeneration", None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2_5_VL")
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[0],
                           out_hidden_size=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, use_cache=False,
                         rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])),
        image_token_id=IMAGE, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).train()


def _samples():
    """Three samples: text, an image of (h, w) patches (h*w/4 merged tokens), text."""
    g = torch.Generator().manual_seed(1)
    out = []
    for pre, (h, w), post in ((3, (4, 4), 5), (2, (2, 6), 2), (6, (4, 2), 1)):
        ids = torch.cat([torch.randint(0, 50, (pre,), generator=g), torch.tensor([VSTART]),
                         torch.full((h * w // 4,), IMAGE), torch.tensor([VEND]),
                         torch.randint(0, 50, (post,), generator=g)])
        types = (ids == IMAGE).int()
        out.append(dict(input_ids=ids, mm_token_type_ids=types, image_grid_thw=torch.tensor([[1, h, w]]),
                        pixel_values=torch.randn(h * w, 3 * 2 * 2 * 2, generator=g)))
    return out


def _packed(model, samples, rows):
    """One row: ids concatenated, each sample's own M-RoPE positions (from position 0), labels
    with the first token of each sample ignored (as DataCollatorWithFlattening does)."""
    pos = [model.model.get_rope_index(s["input_ids"][None], s["mm_token_type_ids"][None],
                                      image_grid_thw=s["image_grid_thw"])[0] for s in samples]
    if rows == 4:  # text positions first, as Qwen2.5-VL / Qwen3-VL also accept
        pos = [torch.cat([torch.arange(p.shape[-1]).view(1, 1, -1), p]) for p in pos]
    labels = [s["input_ids"].clone() for s in samples]
    for lab in labels:
        lab[0] = -100
    return dict(input_ids=torch.cat([s["input_ids"] for s in samples])[None],
                mm_token_type_ids=torch.cat([s["mm_token_type_ids"] for s in samples])[None],
                position_ids=torch.cat(pos, -1), labels=torch.cat(labels)[None],
                pixel_values=torch.cat([s["pixel_values"] for s in samples]),
                image_grid_thw=torch.cat([s["image_grid_thw"] for s in samples]))


def _padded(samples):
    n = max(len(s["input_ids"]) for s in samples)

    def pad(t, v):
        return torch.cat([t, t.new_full((n - len(t),), v)])

    return dict(input_ids=torch.stack([pad(s["input_ids"], 0) for s in samples]),
                mm_token_type_ids=torch.stack([pad(s["mm_token_type_ids"], 0) for s in samples]),
                attention_mask=torch.stack([pad(torch.ones_like(s["input_ids"]), 0) for s in samples]),
                labels=torch.stack([pad(s["input_ids"], -100) for s in samples]),
                pixel_values=torch.cat([s["pixel_values"] for s in samples]),
                image_grid_thw=torch.cat([s["image_grid_thw"] for s in samples]))


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cu_seqlens_from_mrope_positions():
    pos3 = torch.tensor([[0, 1, 2, 2, 2, 3, 0, 1, 0, 1, 1, 3],
                         [0, 1, 2, 2, 3, 4, 0, 1, 0, 1, 2, 3],
                         [0, 1, 2, 3, 2, 4, 0, 1, 0, 1, 2, 3]])[:, None]
    cu = mrope_packed_cu_seqlens(pos3)
    assert cu.dtype == torch.int32 and cu.shape == (13,)
    assert cu.tolist() == [0, 6, 8, 12] + [12] * 9
    text = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3]).view(1, 1, -1)
    assert mrope_packed_cu_seqlens(torch.cat([text, pos3]))[:4].tolist() == [0, 6, 8, 12]


@pytest.mark.parametrize("rows", [3, 4])
def test_packed_equals_padded_qwen2_5_vl(rows):
    model = _model()
    samples = _samples()
    ref_loss, ref_grads = _loss_and_grads(model, _padded(samples))  # eager attention, padded batch
    mk.patch(model)
    enable_mrope_packing(model)
    calls = []
    original = dispatch.select

    def spy(op, inputs, backend=None):
        chosen = original(op, inputs, backend)
        calls.append((op, chosen.name))
        return chosen

    dispatch.select = spy
    try:
        with mk.use_backend("triton"):
            loss, grads = _loss_and_grads(model, _packed(model, samples, rows))
    finally:
        dispatch.select = original
        mk.unpatch(model)
    # 1 vision layer (one packed call over the three images), 2 LM layers: one packed call each
    assert [c for c in calls if c[0].startswith("attention")] == [("attention_varlen", "triton")] * 3, calls
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
def test_packed_lm_compiles_fullgraph():
    """The packed language model (M-RoPE ids (3, 1, L), boundaries derived in the hook) under
    torch.compile(fullgraph=True): no graph break, so no host read; equals eager."""
    model = _model()
    samples = _samples()
    batch = _packed(model, samples, 3)
    mk.patch(model)
    enable_mrope_packing(model)
    lm = model.model.language_model
    embeds = lm.embed_tokens(batch["input_ids"]).detach().requires_grad_()

    def run(fn):
        embeds.grad = None
        out = fn(inputs_embeds=embeds, position_ids=batch["position_ids"]).last_hidden_state
        out.square().sum().backward()
        return out.detach(), embeds.grad.clone()

    try:
        with mk.use_backend("triton"):
            ref = run(lm)
            torch._dynamo.reset()
            got = run(torch.compile(lm, fullgraph=True, backend="aot_eager"))
    finally:
        mk.unpatch(model)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-5)
