"""Which launch candidates a GPU launch of the dense attention kernels gets: the launchers' choice
of candidate list (``attention._launcher`` arguments, spied on an interpreter run) and the lists
themselves (``attention._gpu_configs``)."""

from __future__ import annotations

import torch
from conftest import DEVICE

from mmkernels.kernels import attention as A


def _spied(monkeypatch, lq, lk, mask=None):
    calls = {}
    original = A._launcher

    def spy(kind, *args, **kwargs):
        calls[kind] = kwargs
        return original(kind, *args, **kwargs)

    monkeypatch.setattr(A, "_launcher", spy)
    q = torch.randn(1, 2, lq, 16, device=DEVICE)
    k = torch.randn(1, 2, lk, 16, device=DEVICE)
    out, lse = A.attention_forward(q, k, k, mask, None, 0.0, False, 0.25)
    A.attention_backward(out, q, k, k, out, lse, mask, None, 0.0, False, 0.25)
    return calls


def _tiles(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs]


def test_short_query_tiles(monkeypatch):
    """32 queries (the Q-Former's): the forward and dQ try 32- and 64-row tiles, not 128 rows."""
    calls = _spied(monkeypatch, 32, 40)
    assert calls["fwd"]["lq"] == calls["dq"]["lq"] == 32
    for kind in ("fwd", "dq"):
        tiles = _tiles(A._gpu_configs(kind, 64, torch.bfloat16, short_q=True))
        assert tiles[0][0] == 32 and {bm for bm, _ in tiles} <= {32, 64}, (kind, tiles)
        assert _tiles(A._gpu_configs(kind, 64, torch.bfloat16))[0][0] == 128


def test_key_padding_mask_keeps_the_big_tile(monkeypatch):
    """A (B, 1, 1, Lk) padding mask is read per key (MASK_KIND 3): no mask tile is live, so the
    launchers ask for the unmasked lists (forward default 128×128); a per-query mask does not."""
    pad = torch.rand(1, 1, 1, 40, device=DEVICE) > 0.3
    assert all(not kw["has_mask"] for kw in _spied(monkeypatch, 33, 40, pad).values())
    full = torch.rand(1, 1, 33, 40, device=DEVICE) > 0.3
    assert all(kw["has_mask"] for kw in _spied(monkeypatch, 33, 40, full).values())
    assert _tiles(A._gpu_configs("fwd", 64, torch.bfloat16, has_mask=False))[0] == (128, 128)
    assert _tiles(A._gpu_configs("fwd", 64, torch.bfloat16, has_mask=True))[0] != (128, 128)
