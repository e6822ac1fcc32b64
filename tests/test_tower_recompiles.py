"""Zero recompiles across image sizes for the whole Qwen2.5-VL / Qwen3-VL vision towers (issue 18
item 4): :mod:`mmkernels.integrations.qwen_vl_tower` builds the towers' ``grid_thw``-derived index
tensors on the device with shapes from shapes only, so the tower's forward (installed by
``mk.patch(model, static_tower=True)``, opt-in) has no host read.

Fast (CI): the index helpers are bit-equal to ``transformers.vision_utils`` (the prefix sums up to
their padding of repeated last entries), and the patched tower equals the model's own forward,
forward and backward, on single images, several images of different grids and videos (t > 1).
Opt-in (``-m scale``, minutes in the interpreter): the tower compiled with ``dynamic=True``,
forward + backward over 12 grid sets (single images, videos, several images): no graph break, at
most one recompile after the first call (the 1 -> 2 images step: dynamo specialises a size-1
``grid_thw`` dim), equal to eager."""

from __future__ import annotations

import pytest
import torch

import mmkernels as mk
from mmkernels.integrations import qwen_vl_tower as qt

transformers = pytest.importorskip("transformers")
vision_utils = pytest.importorskip("transformers.vision_utils")

# (t, h, w) per entry, in patches: images, several images of different grids, videos (t > 1),
# grids not divisible into windows, a single-unit (2x2) image beside others
HELPER_GRIDS = [
    [[1, 4, 4]], [[1, 4, 6]], [[2, 6, 4]], [[1, 16, 12]], [[3, 8, 6]],
    [[1, 2, 2], [1, 8, 4], [3, 4, 6]], [[1, 34, 20], [2, 8, 2]], [[1, 2, 8], [1, 8, 2], [1, 10, 10]],
]
# the towers' equality grids: one image, a 3-frame video, then several images of different grids
# beside a 2-frame video (forward + backward on that one)
TOWER_GRIDS = [[[1, 4, 6]], [[3, 4, 4]], [[1, 2, 6], [2, 6, 4], [1, 8, 2]]]


def _qwen2_5_vl(**vision):
    cfg = transformers.Qwen2_5_VLConfig(
        vision_config=dict(dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                                spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1],
                                out_hidden_size=32), **vision),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64,
                         rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])))
    return transformers.Qwen2_5_VLForConditionalGeneration(cfg).model.visual


def _qwen3_vl(**vision):
    cfg = transformers.Qwen3VLConfig(
        vision_config=dict(dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2,
                                spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                                num_position_embeddings=16, deepstack_visual_indexes=[0]), **vision),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, head_dim=16,
                         rope_scaling=dict(rope_type="default", mrope_section=[2, 3, 3])))
    return transformers.Qwen3VLForConditionalGeneration(cfg).model.visual


FAMILIES = {"qwen2_5_vl": ("Qwen2_5_VLConfig", _qwen2_5_vl), "qwen3_vl": ("Qwen3VLConfig", _qwen3_vl)}


def _tower(family):
    name, make = FAMILIES[family]
    if not hasattr(transformers, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    visual = make()
    if not qt.is_qwen_vision_tower(visual):
        pytest.skip(f"{type(visual).__name__} of transformers {transformers.__version__} does not take "
                    "precomputed vision inputs")
    return visual


def _inputs(grid, seed=0):
    g = torch.tensor(grid)
    total = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(total, 3 * 2 * 2 * 2, generator=gen), g


def _assert_padded_prefix_sums(got, ref, what):
    """``got`` = ``ref`` followed by copies of its last entry (trailing empty sequences)."""
    n = ref.shape[0]
    assert got.dtype == torch.int32 and got.shape[0] >= n, what
    assert torch.equal(got[:n], ref.to(torch.int32)), (what, got, ref)
    assert bool((got[n:] == ref[-1]).all()), (what, got, ref)


@pytest.mark.parametrize("grid", HELPER_GRIDS, ids=lambda g: "+".join("x".join(map(str, e)) for e in g))
def test_index_helpers_equal_transformers(grid):
    g = torch.tensor(grid)
    total = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
    units = total // 4
    pos = qt.vision_position_ids(g, total, 2)
    assert torch.equal(pos, vision_utils.get_vision_position_ids(g, 2))
    cu = qt.vision_cu_seqlens(g, total, 2)
    assert cu.shape == (units + 1,)
    _assert_padded_prefix_sums(cu, vision_utils.get_vision_cu_seqlens(g), "cu_seqlens")
    for window_size in (8, 12, 112):  # 2, 3 and 28 merge units a side (patch 2, merge 2)
        index, cu_win = qt.vision_window_index(g, total, 2, window_size, 2)
        ref_index, ref_cu = vision_utils.get_vision_window_index(g, 2, window_size, 2)
        assert torch.equal(index, ref_index), window_size
        assert cu_win.shape == (units + 1,)
        _assert_padded_prefix_sums(cu_win, ref_cu, f"cu_window_seqlens (window {window_size})")
    for side in (4, 7):
        for mode, align in (("bilinear", True), ("bilinear", False), ("bicubic", False)):
            idx, w = qt.vision_interpolation_indices_and_weights(g, total, 2, side, mode, align)
            ref_idx, ref_w = vision_utils.get_vision_interpolation_indices_and_weights(g, side, mode, align, 2)
            assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w), (side, mode, align)


def test_index_shapes_do_not_depend_on_grid_values():
    """Same packed length, different grids (a 4x8 image, two 4x4 images, a 2-frame 4x4 video):
    every tensor has the same shape (from the packed length alone), so one graph serves all three."""
    shapes = set()
    for grid in ([[1, 4, 8]], [[1, 4, 4], [1, 4, 4]], [[2, 4, 4]]):
        g = torch.tensor(grid)
        tensors = (qt.vision_position_ids(g, 32, 2), qt.vision_cu_seqlens(g, 32, 2),
                   *qt.vision_window_index(g, 32, 2, 8, 2),
                   *qt.vision_interpolation_indices_and_weights(g, 32, 2, 4))
        shapes.add(tuple(tuple(t.shape) for t in tensors))
    assert len(shapes) == 1, shapes


def _run(visual, forward, x, g):
    """(pooler_output, last_hidden_state, deepstack features, d pixels, d params) of one forward +
    backward through ``forward``."""
    visual.zero_grad()
    x = x.clone().requires_grad_()
    out = forward(x, grid_thw=g)
    deep = list(getattr(out, "deepstack_features", None) or [])
    loss = out.pooler_output.square().sum() + out.last_hidden_state.square().mean() + sum(d.sum() for d in deep)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}
    return out.pooler_output.detach(), out.last_hidden_state.detach(), [d.detach() for d in deep], x.grad, grads


def _close(got, ref, exact, what):
    """Outputs and gradients of two :func:`_run` s: bit-equal (``exact``) or to fp32 rounding."""
    pairs = [("pooler_output", got[0], ref[0]), ("last_hidden_state", got[1], ref[1]),
             *((f"deepstack {i}", a, b) for i, (a, b) in enumerate(zip(got[2], ref[2])))]
    assert len(got[2]) == len(ref[2])
    if got[3] is not None or ref[3] is not None:
        pairs.append(("d pixels", got[3], ref[3]))
        assert got[4].keys() == ref[4].keys()
        pairs += [(f"d {k}", got[4][k], ref[4][k]) for k in ref[4]]
    for name, a, b in pairs:
        if exact:
            assert torch.equal(a, b), f"{what}: {name} differs by {(a - b).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {name}: {m}")


def _forward_only(visual, forward, x, g):
    with torch.no_grad():
        out = forward(x, grid_thw=g)
    deep = [d for d in (getattr(out, "deepstack_features", None) or [])]
    return out.pooler_output, out.last_hidden_state, deep, None, {}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tower_forward_equals_model_forward(family):
    """mk.patch installs the device-only tower forward; with the same attention it equals the
    model's own forward (host-built index tensors) bit for bit, and the unpatched model to fp32
    rounding, on an image, a video, and several images beside a video (forward + backward).
    attention_varlen runs its sdpa backend here (seconds); the Triton kernels on the padded prefix
    sums: test_tower_triton_kernels_take_padded_prefix_sums and tests/test_attention_varlen.py's
    Qwen tests (mk.patch(static_tower=True) installs this forward)."""
    torch.manual_seed(0)
    visual = _tower(family)
    own = lambda x, grid_thw: type(visual).forward(visual, x, grid_thw=grid_thw)  # noqa: E731
    last = len(TOWER_GRIDS) - 1
    refs = [(_run if i == last else _forward_only)(visual, visual, *_inputs(grid, i))
            for i, grid in enumerate(TOWER_GRIDS)]
    report = mk.patch(visual, pooling=False, static_tower=True)  # pooling=False: the merger's token_pool has no sdpa backend
    try:
        assert ("", "forward") in [(p, m) for p, m, _ in report.methods], str(report)
        assert visual.forward.__func__ is qt.static_vision_forward
        with mk.use_backend("sdpa"):
            for i, grid in enumerate(TOWER_GRIDS):
                run = _run if i == last else _forward_only
                x, g = _inputs(grid, i)
                got = run(visual, visual, x, g)
                _close(got, run(visual, own, x, g), True, f"{grid} vs the model's forward")
                _close(got, refs[i], False, f"{grid} vs the unpatched model")
    finally:
        mk.unpatch(visual)
    assert "forward" not in visual.__dict__


def test_tower_triton_kernels_take_padded_prefix_sums():
    """The Triton varlen kernels on the padded window and full prefix sums (Qwen2.5-VL: a window
    block and a full block; trailing empty sequences in both): bit-equal to the model's forward."""
    visual = _tower("qwen2_5_vl")
    x, g = _inputs(TOWER_GRIDS[-1])
    mk.patch(visual, static_tower=True)
    try:
        with mk.use_backend("triton"), mk.dispatch.record() as calls:
            got = _forward_only(visual, visual, x, g)
        with mk.use_backend("triton"):
            same = _forward_only(visual, lambda x, grid_thw: type(visual).forward(visual, x, grid_thw=grid_thw), x, g)
    finally:
        mk.unpatch(visual)
    assert [c for c in calls if c[0] == "attention_varlen"] == [("attention_varlen", "triton")] * 2, calls
    _close(got, same, True, "triton")


def test_patch_switch_and_standalone_handle():
    """static_tower=False (the default) leaves the tower's forward alone; enable_static_vision_forward installs
    it on its own (idempotent, removable); on blocks that run transformers' attention (which cannot
    take the padded prefix sums) it runs the model's forward."""
    visual = _tower("qwen2_5_vl")
    x, g = _inputs([[1, 4, 6], [2, 4, 4]])
    with torch.no_grad():
        ref = visual(x, grid_thw=g).pooler_output
    handle = qt.enable_static_vision_forward(visual)  # unpatched blocks: the model's forward
    assert handle.towers == [""] and "forward" in visual.__dict__
    with torch.no_grad():
        assert torch.equal(visual(x, grid_thw=g).pooler_output, ref)
    handle.remove()
    assert "forward" not in visual.__dict__
    report = mk.patch(visual)  # opt-in: off by default (the padded prefix sums cost idle programs)
    try:
        assert "forward" not in visual.__dict__
        assert any(why == "static_tower=False" for _, _, why in report.skipped), str(report)
        with qt.enable_static_vision_forward(visual) as handle:
            assert handle.towers == [""] and qt.enable_static_vision_forward(visual).towers == []  # idempotent
            with torch.no_grad(), mk.use_backend("triton"):
                got = visual(x, grid_thw=g).pooler_output
                same = type(visual).forward(visual, x, grid_thw=g).pooler_output
        assert "forward" not in visual.__dict__
    finally:
        mk.unpatch(visual)
    assert torch.equal(got, same)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- compiled, opt-in
# 12 grid sets: 8 with one entry (images and 2- / 3-frame videos), then several images: no image
# merges into ONE token (a 2x2 grid), which would hit dynamo's 0/1 size specialisation
COMPILE_GRIDS = [
    [[1, 4, 4]], [[1, 4, 6]], [[1, 6, 4]], [[1, 2, 8]], [[2, 6, 6]], [[1, 8, 4]], [[3, 2, 6]], [[1, 6, 8]],
    [[1, 4, 4], [1, 6, 4]], [[1, 8, 2], [2, 4, 4]], [[1, 2, 6], [1, 4, 8], [1, 6, 6]], [[2, 4, 6], [1, 8, 8]],
]


@pytest.mark.scale
@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_tower_no_recompile_across_grids(family):
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    visual = _tower(family)
    mk.patch(visual, static_tower=True)
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(visual, backend=cnt, dynamic=True)
    frames = []
    try:
        with mk.use_backend("triton"):
            for i, grid in enumerate(COMPILE_GRIDS):
                x, g = _inputs(grid, i)
                # eager first: the process's first mmkernels call caches triton's import check, which
                # a compiled first call would guard on (one recompile when an eager call fills it)
                ref = _run(visual, visual, x, g)
                got = _run(visual, compiled, x, g)
                # frames dynamo compiled so far (the first compile + each recompile); the backend's own
                # count (cnt.frame_count) also sees an empty graph beside each real one
                frames.append(counters["frames"]["ok"])
                for a, b in zip(got[:2] + (got[3],), ref[:2] + (ref[3],)):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                for a, b in zip(got[2], ref[2]):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                for k in ref[4]:
                    torch.testing.assert_close(got[4][k], ref[4][k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")
    finally:
        mk.unpatch(visual)
    print(f"{family}: frames compiled after each of {len(COMPILE_GRIDS)} grid sets: {frames} (backend graphs: "
          f"{cnt.frame_count}); graph breaks: {dict(counters['graph_break'])}")
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    single = sum(len(grid) == 1 for grid in COMPILE_GRIDS)
    assert frames[single - 1] == frames[0], f"recompiled between single-entry grids: {frames}"
    assert frames[-1] - frames[0] <= 1, f"compiled frames after each grid set: {frames}"
