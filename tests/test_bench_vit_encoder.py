"""``mmkernels bench vit_encoder`` (mmkernels/bench/cases_vit_encoder.py): the packings it builds are
the real towers' (transformers' Qwen2.5-VL and Qwen3-VL vision models, their processors' resize),
the layer mix and FLOP count of the presets, the CPU smoke (every backend timed or a reason), the
mmkernels backends in the Triton interpreter, and on a GPU the CUDA-graph variant."""

from __future__ import annotations

import pytest
import torch

from mmkernels.bench import cases, report, runner, timing
from mmkernels.bench.cases_vit_encoder import (
    MODELS,
    VitEncoderShape,
    full_seqlens,
    qwen_grid,
    smart_resize,
    video_smart_resize,
    window_seqlens,
)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The CLI sets torch's thread count (1 on a CPU): give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cu(lens) -> list[int]:
    return [0, *torch.tensor(lens).cumsum(0).tolist()]


def _op():
    try:
        return cases.load("vit_encoder")
    except cases.OpUnavailable as exc:
        pytest.skip(str(exc))


# --------------------------------------------------------------------------------------------
# the geometry: the processors' resize and the towers' packings
# --------------------------------------------------------------------------------------------
def test_preset_grids_are_the_processors():
    """image_grid_thw / video_grid_thw of the presets, and smart_resize equal to transformers' own."""
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    vid3 = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    q25, q3 = MODELS["qwen25vl"], MODELS["qwen3vl"]
    assert [qwen_grid(q25, 448, 448), qwen_grid(q25, 1080, 1920), qwen_grid(q25, 360, 640, 32)] == \
        [(1, 32, 32), (1, 78, 138), (16, 26, 46)]
    assert [qwen_grid(q3, 448, 448), qwen_grid(q3, 1080, 1920), qwen_grid(q3, 360, 640, 32)] == \
        [(1, 28, 28), (1, 68, 120), (16, 22, 40)]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        h, w = (int(x) for x in torch.randint(40, 4000, (2,), generator=g))
        for factor, lo, hi in ((28, *q25.image_pixels), (32, *q3.image_pixels), (28, *q25.video_pixels)):
            assert smart_resize(h, w, factor, lo, hi) == pil.smart_resize(h, w, factor, lo, hi), (h, w, factor)
        t = int(torch.randint(2, 64, (1,), generator=g))
        assert video_smart_resize(t, h, w, 2, 32, *q3.video_pixels) == \
            vid3.smart_resize(t, h, w, 2, 32, *q3.video_pixels), (t, h, w)


def _record_cu_seqlens(blocks) -> list:
    seen: list = []
    for blk in blocks:
        blk.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs["cu_seqlens"].tolist()),
                                      with_kwargs=True)
    return seen


# (t, h, w) grids with edge windows (h/2, w/2 not multiples of 4), an exact multiple, and a video
GRIDS_25 = [[1, 20, 28], [1, 16, 16], [2, 12, 18], [1, 6, 34]]


def test_window_packing_equals_transformers_qwen25_tower():
    """Every layer's cu_seqlens that transformers' Qwen2.5-VL vision tower (patch 14, merge 2, window
    112, full blocks 1 and 3 of 4) passes to its attention equals the case's, for a packed batch of
    images and a video."""
    mod = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    cfg = Qwen2_5_VLVisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                                 fullatt_block_indexes=[1, 3], in_channels=3)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = mod.Qwen2_5_VisionTransformerPretrainedModel(cfg).eval()
    seen = _record_cu_seqlens(model.blocks)
    grid = torch.tensor(GRIDS_25)
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad():
        model(x, grid_thw=grid)
    s = VitEncoderShape("qwen25vl", tuple(map(tuple, GRIDS_25)), H=2, d=16, depth=4, full_layers=(1, 3))
    assert s.kinds() == ("window", "full", "window", "full")
    assert seen == [_cu(s.seqlens(kind)) for kind in s.kinds()]
    assert len(s.seqlens("window")) == 12 + 4 + 2 * 6 + 5  # windows of 3x4, 2x2, 2 frames of 2x3, 1x5
    if hasattr(model, "get_window_index"):  # transformers < 5.x kept it on the model
        assert model.get_window_index(grid)[1] == _cu(s.seqlens("window"))


def test_full_packing_equals_transformers_qwen3_tower():
    """Qwen3-VL (patch 16, merge 2, all layers full): one sequence per frame group."""
    mod = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig

    cfg = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                              patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                              num_position_embeddings=64, deepstack_visual_indexes=[])
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = mod.Qwen3VLVisionModel(cfg).eval()
    seen = _record_cu_seqlens(model.blocks)
    grids = [[2, 6, 8], [1, 4, 10]]
    grid = torch.tensor(grids)
    x = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 16 * 16)
    with torch.no_grad():
        model(x, grid_thw=grid)
    s = VitEncoderShape("qwen3vl", tuple(map(tuple, grids)), H=2, d=16, depth=2, full_layers=None, patch=16,
                        window_px=0)
    assert s.kinds() == ("full", "full") and not s.windowed
    assert seen == [_cu(full_seqlens(grids))] * 2 == [[0, 48, 96, 136]] * 2


def test_presets_layer_mix_windows_and_flops():
    op = _op()
    shapes = {(sp.preset, sp.id): sp.shape for p in ("qwen25vl", "qwen3vl") for sp in op.presets[p]}
    img = shapes["qwen25vl", "img1080p"]
    assert img.kinds().count("full") == 4 and img.kinds().count("window") == 28 and (img.H, img.d) == (16, 80)
    win = img.seqlens("window")
    assert img.total == 10764 and len(win) == 180 and max(win) == 64 and sum(win) == img.total
    assert win == window_seqlens(((1, 78, 138),))
    fl = 4.0 * 80 * 16 * (28 * sum(L * L for L in win) + 4 * 10764 ** 2)
    assert op.flops(img, "fwd") == pytest.approx(fl)
    vid = shapes["qwen25vl", "video32f"]
    assert vid.total == 19136 and len(vid.seqlens("window")) == 384 and vid.seqlens("full") == (1196,) * 16
    assert shapes["qwen25vl", "img448"].seqlens("window") == (64,) * 16
    q3 = shapes["qwen3vl", "video32f"]
    assert q3.kinds() == ("full",) * 27 and q3.seqlens("full") == (880,) * 16 and (q3.H, q3.d) == (16, 72)
    assert shapes["qwen3vl", "img1080p"].total == 8160 and shapes["qwen3vl", "img448"].total == 784
    # the CPU smoke keeps the geometry: windows and full layers both present, small grids
    for s in shapes.values():
        small = op.scale_for_cpu(s, quick=True)
        assert small.windowed == s.windowed and small.total <= 2 * 16 * 16 and small.d == s.d
        assert set(small.kinds()) == set(s.kinds())
    spec = op.parse_shape("model=qwen25vl,px=1080x1920")
    assert spec.shape == img
    assert op.parse_shape("model=qwen3vl,grid=16x22x40").shape == q3


# --------------------------------------------------------------------------------------------
# the benchmark itself
# --------------------------------------------------------------------------------------------
def test_cpu_smoke_times_every_default_backend_and_gives_a_reason_for_the_rest(tmp_path, capsys):
    from mmkernels.__main__ import main

    op = _op()
    out = tmp_path / "vit.json"
    assert main(["bench", "vit_encoder", "--quick", "--no-ceilings", "--warmup-ms", "0", "--rep-ms", "0",
                 "--json", str(out), "--plain", "--device", "cpu"]) == 0
    doc = report.read_json(out)
    rows = doc["cases"]
    assert {(r["preset"], r["case"]) for r in rows} == {(p, c) for p in ("qwen25vl", "qwen3vl")
                                                         for c in ("img448", "img1080p", "video32f")}
    for r in rows:
        assert r["status"] == "ok" and r["check"]["ok"] and r["scaled_from"], r
    timed = {r["backend"] for r in rows}
    assert {"sdpa-loop", "sdpa-dense"} <= timed
    reasons = {**doc["not_timed"], **doc["left_out"]}
    for name in op.backends():
        assert name in timed or reasons.get(name), name
    assert "CUDA graphs need a CUDA device" in reasons["triton-graph"]
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 100


def _no_timing(fn, device, grads=(), **kw):
    fn()
    timing.sync(device)
    return timing.Timing(1.0, 1.0, 1.0, "none", 1)


def test_mmkernels_backends_match_float64():
    """mk (the dispatcher's choice) and triton on small windowed and full towers: the float64 check
    of the last window and full layer (in the Triton interpreter on a CPU: no timing)."""
    from mmkernels._utils import interpreting

    op = _op()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreting():
        pytest.skip("needs the Triton interpreter (tests/conftest.py turns it on without a GPU)")
    specs = [op.parse_shape("model=qwen25vl,grid=1x8x12,H=1,depth=2,full=1"),
             op.parse_shape("model=qwen3vl,grid=2x4x6,H=1,depth=1")]
    assert specs[0].shape.seqlens("window") == (64, 32)
    cfg = runner.RunConfig(device=device, backends=["sdpa-loop", "mk", "triton"], dtype="float32", rotate=False,
                           timer=_no_timing)
    rows, not_timed, fatal = runner.run(op, specs, cfg)
    assert not not_timed and not fatal
    for r in rows:
        assert r["status"] == "ok" and r["check"]["ok"], r


def test_graph_body_writes_each_layer_into_its_out_buffer():
    """What the CUDA-graph variant captures: mmkernels' call writing into a slot of the preallocated
    output (``out=`` when the op takes it, else a copy) gives the plain call's result."""
    from mmkernels.bench import cases_vit_encoder as vit

    op = _op()
    s = op.parse_shape("model=qwen25vl,grid=1x8x12,H=1,depth=2,full=1").shape
    inputs = op.make_inputs(s, torch.float32, "cpu", torch.Generator().manual_seed(0))
    q, k, v = inputs["qkv"][0].unbind(0)
    out = torch.full((2, s.total, s.H, s.d), float("nan"))
    for i, (kind, lay) in enumerate(op._layouts(s, inputs).items()):
        vit._mk(s, lay, torch.float32, out=True)(q, k, v, out[i])
        assert torch.equal(out[i], vit._mk(s, lay, torch.float32)(q, k, v)), kind
    assert not torch.equal(out[0], out[1])  # windows and full attention differ


@pytest.mark.gpu
def test_graph_variant_on_cuda():
    """The whole forward in one CUDA graph (out= when mmkernels.attention_varlen takes it) gives the
    float64-checked output, replay after replay."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    op = _op()
    spec = op.parse_shape("model=qwen25vl,px=448x448,depth=8,full=3:7")
    cfg = runner.RunConfig(device="cuda", backends=["triton", "triton-graph"], dtype="bfloat16", quick=True)
    rows, not_timed, fatal = runner.run(op, [spec], cfg)
    assert not not_timed and not fatal
    for r in rows:
        assert r["status"] == "ok" and r["check"]["ok"], r
