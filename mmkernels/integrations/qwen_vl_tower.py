"""Device-only vision-tower forward for Qwen2.5-VL and Qwen3-VL (issue 18 item 4: zero recompiles
across image sizes).

transformers (5.x) builds the tower's index tensors from ``grid_thw`` on the host:
``get_vision_position_ids`` and ``get_vision_window_index`` loop over ``grid_thw.tolist()``,
``get_vision_cu_seqlens`` and Qwen3-VL's position-embedding interpolation call
``repeat_interleave`` with a tensor of repeats, and the window prefix sums go through
``unique_consecutive``.  Under ``torch.compile`` each of these is a graph break, and the values
read on the host become guards, so every new image size recompiles.

The helpers here compute the same tensors with device ops whose output *shapes* depend only on
the input shapes (the packed patch count ``total = hidden_states.shape[0]``, the number of grid
entries, the config), never on the grid values: no ``.tolist()``, ``.item()``, ``nonzero``,
boolean indexing, ``repeat_interleave`` with tensor repeats or ``unique``.  Each merge unit
(``spatial_merge_size**2`` consecutive patches) finds its grid entry with one ``searchsorted``
over the entries' unit counts and decodes its (frame, row, column) arithmetically.  Where the
model's count depends on the values (the number of frames for the full-attention ``cu_seqlens``,
the number of windows for ``cu_window_seqlens``), the prefix sums are padded to the shape-derived
bound ``total // spatial_merge_size**2 + 1`` entries by repeating the last one (trailing
zero-length sequences, which :func:`mmkernels.attention_varlen` skips).  Every other tensor is
exactly the model's own.

:func:`static_vision_forward` (installed on a tower instance by
:func:`enable_static_vision_forward`, or by :func:`mmkernels.patch`) computes them and hands them
to the model's own ``forward`` through the precomputed-input kwargs transformers' vision encoders
accept (``position_ids``, ``cu_seqlens``, ``window_index`` / ``cu_window_seqlens``,
``interp_indices`` / ``interp_weights``; see ``transformers.vision_utils``), so the rest of the
forward (patch embedding, blocks, merger, deepstack, output capture) is the model's code.  The
blocks' attention must not read the prefix sums on the host either: with
:func:`mmkernels.patch` it is :func:`mmkernels.integrations.qwen_vl.qwen_vision_attention_forward`
(one ``attention_varlen`` per block).  transformers' own vision attention splits the packing with
``lengths.tolist()`` (and its sdpa path fails on the padding's empty sequences), so on a tower
whose blocks do not run that forward :func:`static_vision_forward` runs the model's forward as is.
"""

from __future__ import annotations

import functools
import types

import torch

__all__ = [
    "QWEN_VISION_TOWER_CLASSES",
    "StaticVisionForwardHandle",
    "enable_static_vision_forward",
    "is_qwen_vision_tower",
    "static_vision_forward",
    "static_vision_inputs",
    "vision_cu_seqlens",
    "vision_interpolation_indices_and_weights",
    "vision_position_ids",
    "vision_unit_coords",
    "vision_window_index",
]

# tower class -> its family: "window" (Qwen2.5-VL: window index + rotary position ids + full
# cu_seqlens) or "interp" (Qwen3-VL: interpolated learned position embeddings + rotary position ids
# + full cu_seqlens); checked against the transformers 5.25 sources
QWEN_VISION_TOWER_CLASSES = {
    "Qwen2_5_VisionTransformerPretrainedModel": "window",
    "Qwen3VLVisionModel": "interp",
    "Qwen3VLMoeVisionModel": "interp",
}
_FORWARD_ATTR = "_mmkernels_static_vision_forward"


# --------------------------------------------------------------------------------------
# pure index helpers (device ops, shapes from shapes only)
# --------------------------------------------------------------------------------------
def vision_unit_coords(grid_thw: torch.Tensor, total: int, spatial_merge_size: int):
    """Where each merge unit of the packing sits: for the ``total // m**2`` units (``m`` =
    ``spatial_merge_size``; a unit is m×m consecutive patches, the processor's order: entries one
    after the other, frames, then unit rows and columns of the merged grid), the int64 tensors
    ``(entry, start, frame, row, col, llm_h, llm_w)``: the grid entry, the entry's first unit, the
    frame in the entry, the unit's row and column in the merged (h/m, w/m) grid, and that grid's
    height and width.  Device ops only; every output has ``total // m**2`` elements."""
    m = int(spatial_merge_size)
    units = total // (m * m)
    g = grid_thw.to(torch.int64)
    llm_h, llm_w = g[:, 1] // m, g[:, 2] // m
    per_entry = g[:, 0] * llm_h * llm_w
    ends = torch.cumsum(per_entry, 0)
    u = torch.arange(units, device=grid_thw.device, dtype=torch.int64)
    # the entry of each unit; clamped so that a total beyond the grid's sum still indexes in range
    entry = torch.searchsorted(ends, u, right=True).clamp_(max=grid_thw.shape[0] - 1)
    start = (ends - per_entry)[entry]
    lh, lw = llm_h[entry], llm_w[entry]
    frame_units = (lh * lw).clamp(min=1)
    local = u - start
    frame = local // frame_units
    rem = local - frame * frame_units
    lw1 = lw.clamp(min=1)
    row = rem // lw1
    col = rem - row * lw1
    return entry, start, frame, row, col, lh, lw


def _prefix_sums(seq_id: torch.Tensor, unit_tokens: int) -> torch.Tensor:
    """int32 prefix sums (len(seq_id) + 1,) of the sequences numbered by ``seq_id`` (non-decreasing,
    from 0, one per unit in packing order), in tokens: entry k = tokens of sequences < k; entries past
    the last sequence repeat the total (empty sequences)."""
    k = torch.arange(seq_id.shape[0] + 1, device=seq_id.device, dtype=seq_id.dtype)
    return (torch.searchsorted(seq_id, k) * unit_tokens).to(torch.int32)


def vision_position_ids(grid_thw: torch.Tensor, total: int, spatial_merge_size: int) -> torch.Tensor:
    """The vision RoPE position ids, equal to ``transformers.vision_utils.get_vision_position_ids(
    grid_thw, spatial_merge_size)``: (total, 2) int64, (row, column) of each patch in its image,
    in the m×m-block-major order of the packing, repeated for each frame."""
    m = int(spatial_merge_size)
    _, _, _, row, col, _, _ = vision_unit_coords(grid_thw, total, m)
    k = torch.arange(m * m, device=grid_thw.device, dtype=torch.int64)
    hpos = row[:, None] * m + k // m
    wpos = col[:, None] * m + k % m
    return torch.stack([hpos.reshape(-1), wpos.reshape(-1)], dim=-1)


def vision_cu_seqlens(grid_thw: torch.Tensor, total: int, spatial_merge_size: int) -> torch.Tensor:
    """Full-attention prefix sums, one sequence per frame (``get_vision_cu_seqlens(grid_thw)``),
    padded to ``total // m**2 + 1`` int32 entries by repeating the last (the number of frames,
    ``grid_thw[:, 0].sum()``, is a value; each frame holds at least one unit)."""
    m = int(spatial_merge_size)
    entry, _, frame, _, _, _, _ = vision_unit_coords(grid_thw, total, m)
    # frames of earlier entries + this one's frame: non-decreasing over the packing
    frames_before = torch.cumsum(grid_thw[:, 0].to(torch.int64), 0) - grid_thw[:, 0].to(torch.int64)
    return _prefix_sums(frames_before[entry] + frame, m * m)


def vision_window_index(grid_thw: torch.Tensor, total: int, spatial_merge_size: int, window_size: int,
                        patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's window attention layout (``get_vision_window_index``): ``window_index``
    (total // m**2,) int64, the merge units in window order (windows of
    ``window_size // m // patch_size`` units a side, raster order per frame; units raster inside a
    window), and ``cu_window_seqlens``, the windows' int32 prefix sums in tokens, padded to
    ``total // m**2 + 1`` entries by repeating the last (the model's drops its empty windows with
    ``unique_consecutive``; the number of windows is a value).  ``torch.argsort(window_index)``
    (the model's reverse index) is the position of each unit in window order."""
    m = int(spatial_merge_size)
    v = window_size // m // patch_size
    if v < 1:
        raise ValueError(f"window_size {window_size} is smaller than spatial_merge_size * patch_size = "
                         f"{m * patch_size}")
    entry, start, frame, row, col, lh, lw = vision_unit_coords(grid_thw, total, m)
    wr, wc = row // v, col // v  # the unit's window
    ir, ic = row - wr * v, col - wc * v  # its place in the window
    win_h = torch.minimum(lh - wr * v, torch.full_like(lh, v))  # rows of this window row
    win_w = torch.minimum(lw - wc * v, torch.full_like(lw, v))  # columns of this window
    # position in window order: earlier entries and frames, the full window rows above, the
    # windows to the left in this window row, then raster inside the window
    dest = start + frame * lh * lw + wr * v * lw + wc * v * win_h + ir * win_w + ic
    units = dest.shape[0]
    arange = torch.arange(units, device=grid_thw.device, dtype=torch.int64)
    window_index = torch.empty_like(dest).scatter_(0, dest, arange)
    # window id of each unit in window order: +1 at each window's first unit
    first = ((ir == 0) & (ic == 0)).to(torch.int64)
    window_id = torch.cumsum(first[window_index], 0) - 1
    return window_index, _prefix_sums(window_id, m * m)


def vision_interpolation_indices_and_weights(grid_thw: torch.Tensor, total: int, spatial_merge_size: int,
                                             num_grid_per_side: int, mode: str = "bilinear",
                                             align_corners: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-VL's learned position embeddings resampled to each image's grid
    (``get_vision_interpolation_indices_and_weights(grid_thw, num_grid_per_side, mode,
    align_corners, spatial_merge_size)``): (total, n_taps) int64 indices into the flattened
    (side, side) table and float32 weights (n_taps = 4 bilinear, 16 bicubic), per patch of the
    packing (m×m-block-major order)."""
    m = int(spatial_merge_size)
    entry, _, _, row, col, lh, lw = vision_unit_coords(grid_thw, total, m)
    k = torch.arange(m * m, device=grid_thw.device, dtype=torch.int64)
    rows = (row[:, None] * m + k // m).reshape(-1)
    cols = (col[:, None] * m + k % m).reshape(-1)
    heights = (lh * m)[:, None].expand(-1, m * m).reshape(-1)
    widths = (lw * m)[:, None].expand(-1, m * m).reshape(-1)
    side = int(num_grid_per_side)
    h_taps, h_w = _axis_taps_weights(rows, heights, side, mode, align_corners)
    w_taps, w_w = _axis_taps_weights(cols, widths, side, mode, align_corners)
    n = h_taps.shape[1]
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, n * n)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, n * n)
    return indices, weights


def _axis_taps_weights(index, size, side: int, mode: str, align_corners: bool):
    """Taps and weights along one axis, as ``transformers.vision_utils._interpolation_axis_taps_weights``
    (border padding): the same float32 arithmetic, so the weights are bit-equal."""
    index = index.to(torch.float32)
    if align_corners:
        src = index * (side - 1) / torch.clamp(size - 1, min=1)
    else:
        src = (index + 0.5) * side / size - 0.5
    floor = torch.floor(src)
    if mode == "bilinear":
        offsets = torch.arange(0, 2, device=index.device)
    elif mode == "bicubic":
        offsets = torch.arange(-1, 3, device=index.device)
    else:
        raise ValueError(f"interpolation mode {mode!r}: expected 'bilinear' or 'bicubic'")
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    distance = (src[:, None] - floor[:, None] - offsets).abs()
    if mode == "bilinear":
        weights = (1 - distance).clamp(min=0)
    else:
        a = -0.75
        near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
        far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
        weights = torch.where(distance <= 1, near, far)
    return taps, weights


# --------------------------------------------------------------------------------------
# the tower forward
# --------------------------------------------------------------------------------------
def is_qwen_vision_tower(m: torch.nn.Module) -> bool:
    """Whether ``m`` is one of transformers' Qwen vision towers listed in
    :data:`QWEN_VISION_TOWER_CLASSES` (exact class) whose forward takes the precomputed-input kwargs."""
    cls = type(m)
    if cls.__name__ not in QWEN_VISION_TOWER_CLASSES or not cls.__module__.startswith("transformers.models."):
        return False
    if not all(hasattr(m, a) for a in ("spatial_merge_size", "blocks", "rotary_pos_emb", "config")):
        return False
    if QWEN_VISION_TOWER_CLASSES[cls.__name__] == "window":
        ok = all(hasattr(m, a) for a in ("window_size", "patch_size", "fullatt_block_indexes"))
    else:
        ok = all(hasattr(m, a) for a in ("pos_embed", "num_grid_per_side"))
    return ok and _takes_precomputed_kwargs(cls)


@functools.lru_cache(maxsize=None)
def _takes_precomputed_kwargs(cls: type) -> bool:
    """transformers >= 5.x vision encoders read their index tensors through
    ``transformers.vision_utils.get_vision_*(..., kwargs=kwargs)``, which pop a precomputed one."""
    import inspect
    import sys

    mod = sys.modules.get(cls.__module__)
    if mod is None or not hasattr(mod, "get_vision_position_ids"):
        return False
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "kwargs=kwargs" in src and "get_vision_position_ids" in src


def static_vision_inputs(tower: torch.nn.Module, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> dict:
    """The index tensors ``tower``'s forward would build from ``grid_thw`` on the host, built on
    the device from shapes (see the module docstring), as the kwargs its forward accepts."""
    kind = QWEN_VISION_TOWER_CLASSES[type(tower).__name__]
    total = hidden_states.shape[0]
    m = tower.spatial_merge_size
    out = {"position_ids": vision_position_ids(grid_thw, total, m),
           "cu_seqlens": vision_cu_seqlens(grid_thw, total, m)}
    if kind == "window":
        out["window_index"], out["cu_window_seqlens"] = vision_window_index(
            grid_thw, total, m, tower.window_size, tower.patch_size)
    else:
        out["interp_indices"], out["interp_weights"] = vision_interpolation_indices_and_weights(
            grid_thw, total, m, tower.num_grid_per_side, getattr(tower, "interpolation_mode", "bilinear"),
            getattr(tower, "interpolation_align_corners", True))
    return out


_PRECOMPUTED = ("position_ids", "cu_seqlens", "window_index", "cu_window_seqlens", "interp_indices",
                "interp_weights")


def static_vision_forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
    """The tower's forward (``Qwen2_5_VisionTransformerPretrainedModel`` / ``Qwen3VLVisionModel``)
    with its ``grid_thw``-derived index tensors built on the device (:func:`static_vision_inputs`)
    and passed to the model's own forward as precomputed inputs: no host read, output shapes from
    input shapes only, so ``torch.compile(dynamic=True)`` traces it in one graph that serves every
    image grid.  A caller's own precomputed tensors (any of ``position_ids``, ``cu_seqlens``,
    ``window_index`` + ``cu_window_seqlens``, ``interp_indices`` + ``interp_weights``) win.
    Same outputs as the model's forward (``last_hidden_state`` in window order for Qwen2.5-VL,
    ``pooler_output`` merged in image order)."""
    if not _blocks_on_varlen(self):
        # transformers' own vision attention splits the packing on the host (lengths.tolist()) and
        # its sdpa path fails on the padding's empty sequences: keep the model's forward
        return type(self).forward(self, hidden_states, grid_thw, **kwargs)
    if grid_thw.device != hidden_states.device:  # the prefix sums must sit beside the activations
        grid_thw = grid_thw.to(hidden_states.device)
    if not any(k in kwargs for k in _PRECOMPUTED):
        kwargs.update(static_vision_inputs(self, hidden_states, grid_thw))
    else:  # fill in only what the caller did not give (window / interp tensors come in pairs)
        for key, value in static_vision_inputs(self, hidden_states, grid_thw).items():
            kwargs.setdefault(key, value)
    return type(self).forward(self, hidden_states, grid_thw, **kwargs)


def _blocks_on_varlen(tower: torch.nn.Module) -> bool:
    """Whether every block's attention runs :func:`mmkernels.integrations.qwen_vl.qwen_vision_attention_forward`
    (what :func:`mmkernels.patch` installs), which takes the padded prefix sums."""
    from .qwen_vl import qwen_vision_attention_forward

    for blk in tower.blocks:
        fwd = getattr(getattr(blk, "attn", None), "forward", None)
        if getattr(fwd, "__func__", None) is not qwen_vision_attention_forward:
            return False
    return True


class StaticVisionForwardHandle:
    """What :func:`enable_static_vision_forward` returns: ``towers`` (the module paths patched by
    this call) and ``remove()``, which puts the class's forward back on them."""

    def __init__(self, towers: list[tuple[str, torch.nn.Module]]):
        self._towers = towers

    @property
    def towers(self) -> list[str]:
        return [path for path, _ in self._towers]

    def remove(self) -> None:
        for _, m in self._towers:
            if m.__dict__.get(_FORWARD_ATTR):
                m.__dict__.pop("forward", None)
                m.__dict__.pop(_FORWARD_ATTR, None)
        self._towers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def enable_static_vision_forward(model: torch.nn.Module) -> StaticVisionForwardHandle:
    """Install :func:`static_vision_forward` on every Qwen2.5-VL / Qwen3-VL vision tower inside
    ``model`` (on the instance; the class is untouched).  Idempotent (a tower already switched is
    left as is and not in the handle); ``handle.remove()`` (or ``with``) undoes it.

    :func:`mmkernels.patch` already installs it (with the vision attention on
    ``attention_varlen``); this is for a model patched with ``static_tower=False`` or a tower
    handled alone.  The padded prefix sums need the blocks' attention to be mmkernels'
    (:func:`mmkernels.integrations.qwen_vl.qwen_vision_attention_forward`): on a tower whose
    blocks run transformers' attention the forward installed here runs the model's own::

        mk.patch(model)                                   # attention + this tower forward
        visual = torch.compile(model.model.visual, dynamic=True)   # one graph for every image size
    """
    done = []
    for path, m in model.named_modules():
        if is_qwen_vision_tower(m) and not m.__dict__.get(_FORWARD_ATTR) and "forward" not in m.__dict__:
            m.__dict__["forward"] = types.MethodType(static_vision_forward, m)
            m.__dict__[_FORWARD_ATTR] = True
            done.append((path, m))
    return StaticVisionForwardHandle(done)
