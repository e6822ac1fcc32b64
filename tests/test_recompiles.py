"""Zero recompiles across image sizes (issue 18 item 4), the part mmkernels owns: the patched
Qwen2.5-VL / Qwen3-VL vision blocks (one ``attention_varlen`` per block, rotary fused) compiled with
``dynamic=True``, forward + backward over 10 image grids: no graph break, at most one recompile
after the first call, and equal to eager.

Not covered here (see the issue's closing note): the towers' own ``forward`` in transformers 5.x
graph-breaks before the blocks run — ``get_vision_position_ids`` / ``get_window_index`` read
``grid_thw.tolist()`` and ``cu_seqlens`` comes from ``repeat_interleave`` on a tensor of repeats —
so the block inputs are built eagerly here, by the model's own code."""

from __future__ import annotations

import pytest
import torch

import mmkernels as mk

transformers = pytest.importorskip("transformers")

# 10 grids, none of 2x2 patches: an image that merges into ONE token hits dynamo's 0/1 size
# specialisation and costs one more recompile (measured: frames [2, 3, 3, 3, 3, 3, 3, 4, ...] with
# (2, 2) in the list)
GRIDS = [(4, 4), (4, 6), (6, 4), (2, 8), (8, 2), (6, 6), (4, 8), (8, 4), (2, 6), (6, 8)]


def _qwen2_5_vl():
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1],
                           out_hidden_size=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64,
                         rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])))
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).model.visual


def _qwen3_vl():
    cfg = transformers.Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[]),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, head_dim=16,
                         rope_scaling=dict(rope_type="default", mrope_section=[2, 3, 3])))
    return transformers.Qwen3VLForConditionalGeneration(cfg).model.visual


def _block_inputs(visual, grid):
    """What each vision block receives for one image of ``grid`` (h, w) patches, recorded from an
    eager forward of the tower: (hidden_states into block 0, [cu_seqlens per block], (cos, sin))."""
    h, w = grid
    seen = []

    def hook(module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        seen.append((hs.detach(), kwargs["cu_seqlens"], tuple(t.detach() for t in kwargs["position_embeddings"])))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in visual.blocks]
    try:
        with torch.no_grad():
            visual(torch.randn(h * w, 24), grid_thw=torch.tensor([[1, h, w]]))
    finally:
        for handle in handles:
            handle.remove()
    return seen[0][0], [s[1] for s in seen], seen[0][2]


@pytest.mark.scale
@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_blocks_no_recompile_across_grids(family):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    if not hasattr(transformers, "Qwen3VLConfig" if family == "qwen3_vl" else "Qwen2_5_VLConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    torch.manual_seed(0)
    visual = (_qwen2_5_vl if family == "qwen2_5_vl" else _qwen3_vl)()
    mk.patch(visual)

    def blocks(hidden, cus, cos, sin):
        for blk, cu in zip(visual.blocks, cus):
            hidden = blk(hidden, cu_seqlens=cu, position_embeddings=(cos, sin))
        return hidden

    def step(fn, hidden, cus, rotary):
        hidden = hidden.clone().requires_grad_()
        visual.zero_grad()
        out = fn(hidden, cus, *rotary)
        out.square().sum().backward()
        return out.detach(), hidden.grad, [p.grad.clone() for p in visual.blocks.parameters()]

    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(blocks, backend=cnt, dynamic=True)
    frames = []
    with mk.use_backend("triton"):
        for grid in GRIDS:
            hidden, cus, rotary = _block_inputs(visual, grid)
            got = step(compiled, hidden, cus, rotary)
            frames.append(cnt.frame_count)
            ref = step(blocks, hidden, cus, rotary)
            for a, b in zip(got[:2] + tuple(got[2]), ref[:2] + tuple(ref[2])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert frames[-1] - frames[0] <= 1, f"compiled frames after each grid: {frames}"
    print(f"{family}: frames compiled after each of {len(GRIDS)} grids: {frames}")
