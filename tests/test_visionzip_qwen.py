"""mk.VisionZip on Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers (tiny random configs).

The patched tower (Triton, interpreter) picks each image's dominant merged tokens from the key
importance fused into the last full-attention block's packed forward.  Expected: the *unpatched*
tower's output, pruned by the same rule with scores computed independently — a float64 torch
reference from that block's inputs (its q/k recomputed and rotated), or ``mk.attention_scores``
per image — and, with contextual tokens, keys from the same block.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

import mmkernels as mk
from mmkernels.integrations.prune import kept_index, visionzip_apply, visionzip_plan
from mmkernels.reference.attention_varlen import apply_rotary

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# two images (4x4, 2x6 patches) and a 2-frame video (2x4): 16 + 12 + 16 patches, 4 + 3 + 2·2 merged
GRID = [[1, 4, 4], [1, 2, 6], [2, 2, 4]]


def _cls(name):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _tower(family):
    if family == "qwen2-vl":
        cfg = _cls("Qwen2VLConfig")(vision_config=dict(depth=2, embed_dim=64, hidden_size=32, num_heads=2,
                                                       patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                                                       mlp_ratio=2))
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel as T
        grid = GRID
    elif family == "qwen2.5-vl":
        cfg = _cls("Qwen2_5_VLConfig")(vision_config=dict(depth=3, hidden_size=64, intermediate_size=64, num_heads=2,
                                                          patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                                                          window_size=8, fullatt_block_indexes=[1],
                                                          out_hidden_size=32))
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel as T
        grid = [[1, 4, 8], [1, 2, 6], [2, 4, 4]]  # several 2x2-group windows per image
    else:
        cfg = _cls("Qwen3VLConfig")(vision_config=dict(depth=2, hidden_size=64, intermediate_size=64, num_heads=2,
                                                       patch_size=2, spatial_merge_size=2, temporal_patch_size=2,
                                                       out_hidden_size=32, num_position_embeddings=16,
                                                       deepstack_visual_indexes=[0]))
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel as T
        grid = GRID
    torch.manual_seed(0)
    tower = T._from_config(cfg.vision_config).to(DEVICE).eval()
    grid = torch.tensor(grid, device=DEVICE)
    n = int(grid.prod(-1).sum())
    pix = torch.randn(n, 3 * 2 * 2 * 2, device=DEVICE)
    return tower, pix, grid


def _scoring_block(tower):
    full = getattr(tower, "fullatt_block_indexes", None)
    return max(full) if full else len(tower.blocks) - 1


def _capture_block_inputs(tower):
    """Run the unpatched tower; return its output and the scoring block's attention inputs."""
    seen = {}

    def pre(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["cu"] = kwargs["cu_seqlens"]
        seen["rot"] = kwargs["position_embeddings"]

    attn = tower.blocks[_scoring_block(tower)].attn
    h = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        return seen, h
    finally:
        pass


def _qk(attn, seen):
    total = seen["hidden"].shape[0]
    q, k, _ = attn.qkv(seen["hidden"]).reshape(total, 3, attn.num_heads, -1).unbind(1)
    cos, sin = seen["rot"]
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), k


def _reference_scores(q, k, cu):
    """float64 per attention sequence: softmax(q kᵀ / sqrt(d)) summed over rows, heads averaged."""
    out = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
    c = cu.tolist()
    for s in range(len(c) - 1):
        qs, ks = (t[c[s]:c[s + 1]].double().transpose(0, 1) for t in (q, k))
        p = torch.softmax(qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        out[c[s]:c[s + 1]] = p.sum(1).mean(0)
    return out


def _mk_scores(q, k, cu):
    """The same from mk.attention_scores, one image (sequence) at a time."""
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    c = cu.tolist()
    for s in range(len(c) - 1):
        qs, ks = (t[c[s]:c[s + 1]].transpose(0, 1)[None] for t in (q, k))
        out[c[s]:c[s + 1]] = mk.attention_scores(qs, ks, query_index=None)[0]
    return out


def _expected(tower, grid, pooled, deep, scores, keys, dominant, contextual):
    """The VisionZip rule on the unpatched output: merged-token scores (2x2 sums) per image/frame."""
    unit = tower.spatial_merge_size ** 2
    gs = scores.float().view(-1, unit).sum(1)
    gk = keys.float().mean(1).view(-1, unit, keys.shape[-1]).mean(1)
    if hasattr(tower, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        wi, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=tower.window_size, patch_size=2)
        rev = torch.argsort(wi)
        gs, gk = gs[rev], gk[rev]
    outs, index, start = [[] for _ in (pooled, *deep)], [], 0
    for t, h, w in grid.tolist():
        for _ in range(t):
            n = h * w // unit
            d = min(n, max(1, round(dominant * n)) if isinstance(dominant, float) else dominant)
            seg = gs[start:start + n]
            top = seg.sort(descending=True).values
            if d < n:  # the test's selection must not hinge on a near-tie
                assert top[d - 1] - top[d] > 1e-5 * top[0], (top, d)
            plan = visionzip_plan(seg, gk[start:start + n], d, min(contextual, n - d))
            assert torch.equal(plan[0], seg.topk(d).indices.sort().values)
            for lst, f in zip(outs, (pooled, *deep)):
                lst.append(visionzip_apply(f[start:start + n], plan))
            index.append(plan[0] + start)
            start += n
    return [torch.cat(o) for o in outs], torch.cat(index)


@pytest.mark.parametrize("family,dominant,contextual,source", [
    ("qwen2-vl", 2, 1, "mk.attention_scores"),
    ("qwen2.5-vl", 0.5, 1, "reference"),
    ("qwen3-vl", 2, 0, "reference"),
])
def test_pruned_tower_equals_tower_then_pruning(family, dominant, contextual, source):
    tower, pix, grid = _tower(family)
    seen, handle = _capture_block_inputs(tower)
    with torch.no_grad():
        ref = tower(pix, grid_thw=grid)
    handle.remove()
    attn = tower.blocks[_scoring_block(tower)].attn
    with torch.no_grad():
        q, k, k_raw = _qk(attn, seen)
    ref_scores = _reference_scores(q, k, seen["cu"])
    scores = _mk_scores(q, k, seen["cu"]) if source == "mk.attention_scores" else ref_scores
    assert (scores.double() - ref_scores).abs().max() < 1e-5
    deep = list(getattr(ref, "deepstack_features", None) or [])
    expected, expected_index = _expected(tower, grid, ref.pooler_output, deep, scores, k_raw, dominant, contextual)

    report = mk.patch(tower, prune=mk.VisionZip(dominant=dominant, contextual=contextual))
    assert any("VisionZip" in what for _, _, what in report.methods), str(report)
    try:
        with torch.no_grad(), mk.use_backend("triton"), mk.dispatch.record() as calls:
            out = tower(pix, grid_thw=grid)
        assert kept_index(tower).tolist() == expected_index.tolist()
    finally:
        mk.unpatch(tower)
    assert [c for c in calls if c[0].startswith("attention")] == [("attention_varlen", "triton")] * len(tower.blocks)
    assert out.pooler_output.shape == expected[0].shape
    assert (out.pooler_output - expected[0]).abs().max() < 5e-5
    for got, want in zip(out.deepstack_features if deep else [], expected[1:]):
        assert got.shape == want.shape and (got - want).abs().max() < 5e-5
    # unpatched again: the full output, no hook left behind
    with torch.no_grad():
        again = tower(pix, grid_thw=grid)
    assert again.pooler_output.shape == ref.pooler_output.shape


def test_visionzip_qwen_bad_input():
    with pytest.raises(ValueError, match="VisionZip.dominant"):
        mk.VisionZip(dominant=1.5)
    tower, _, _ = _tower("qwen2-vl")
    with pytest.raises(ValueError, match="must run on mmkernels"):
        mk.patch(tower, attention=False, prune=mk.VisionZip(dominant=2, contextual=0))
    cfg = _cls("Qwen2VLConfig")(
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])))
    model = _cls("Qwen2VLForConditionalGeneration")(cfg)
    with pytest.raises(ValueError, match="patch its vision tower alone"):
        mk.patch(model, prune=mk.VisionZip(dominant=2))
