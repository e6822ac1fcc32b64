"""Sequence-parallel packed attention (``mmkernels.distributed.ulysses_attention_varlen``):
2 gloo ranks on CPU equal the single-process ``mk.attention_varlen`` over the whole packing,
forward and gradients, with sequences straddling the rank boundary; plus the validation errors."""

import time

import pytest
import torch
from conftest import DEVICE

import mmkernels as mk
from mmkernels.distributed import _validate, ulysses_attention_varlen

WORLD = 2
T, H, D = 96, 4, 16
LENGTHS = (40, 30, 26)  # boundaries 40, 70: the rank boundary at 48 (or 50) cuts the 2nd sequence

# name -> (kv heads, shard sizes, is_causal, rotary)
CASES = {
    "equal": (H, (48, 48), False, False),
    "equal_causal": (H, (48, 48), True, False),
    "gqa_uneven_causal_rotary": (2, (50, 46), True, True),
}


def _inputs(hkv, rotary):
    g = torch.Generator().manual_seed(1234 + hkv + 7 * rotary)
    q = torch.randn(T, H, D, generator=g)
    k = torch.randn(T, hkv, D, generator=g)
    v = torch.randn(T, hkv, D, generator=g)
    go = torch.randn(T, H, D, generator=g)
    rot = None
    if rotary:
        freqs = torch.randn(T, D // 2, generator=g)
        rot = (freqs.cos(), freqs.sin())
    return q, k, v, go, rot


def _cu():
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)


def _kwargs(hkv, causal, rot):
    return dict(is_causal=causal, enable_gqa=hkv != H, rotary=rot, backend="triton")


def _worker(rank, path):
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}.rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        results = {}
        cu = _cu()
        for name, (hkv, shards, causal, rotary) in CASES.items():
            q, k, v, go, rot = _inputs(hkv, rotary)
            lo, hi = sum(shards[:rank]), sum(shards[:rank + 1])
            ql, kl, vl = (t[lo:hi].clone().requires_grad_() for t in (q, k, v))
            out = ulysses_attention_varlen(ql, kl, vl, cu, cu, max(LENGTHS), max(LENGTHS), shard_sizes=shards,
                                           **_kwargs(hkv, causal, rot))
            out.backward(go[lo:hi])
            results[name] = (out.detach(), ql.grad, kl.grad, vl.grad)
        # a 1-rank group (each rank its own): the P == 1 path, no collective, the whole packing
        groups = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
        q, k, v, go, rot = _inputs(H, False)
        results["one_rank_group"] = ulysses_attention_varlen(q, k, v, cu, cu, group=groups[rank],
                                                             **_kwargs(H, False, None))
        torch.save(results, f"{path}.rank{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="the gloo run is a CPU test")
def test_two_ranks_equal_single_rank(tmp_path):
    """2 gloo processes: each rank's output rows and q/k/v shard gradients equal the
    single-process attention_varlen over the whole packing (fp32, max abs err <= 1e-5)."""
    import torch.multiprocessing as mp

    path = str(tmp_path / "sp")
    ctx = mp.spawn(_worker, args=(path,), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the 2-process sequence-parallel run did not finish in 180 s")
    per_rank = [torch.load(f"{path}.rank{r}") for r in range(WORLD)]
    cu = _cu()
    for name, (hkv, shards, causal, rotary) in CASES.items():
        q, k, v, go, rot = _inputs(hkv, rotary)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        ref = mk.attention_varlen(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS), **_kwargs(hkv, causal, rot))
        ref.backward(go)
        want = (ref.detach(), q.grad, k.grad, v.grad)
        got = [torch.cat([per_rank[r][name][i] for r in range(WORLD)]) for i in range(4)]
        for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            assert g.shape == w.shape, (name, what, g.shape, w.shape)
            err = (g - w).abs().max().item()
            print(f"{name} {what}: max abs err {err:.3g}")
            assert err <= 1e-5, f"{name} {what}: max abs err {err:.3g}"
        if name == "equal":
            for r in range(WORLD):
                assert (per_rank[r]["one_rank_group"] - want[0]).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- validation
def _t(*shape):
    return torch.zeros(*shape)


@pytest.mark.parametrize("args, match", [
    ((_t(48, 3, 16), _t(48, 3, 16), _t(48, 3, 16)), r"query: 3 heads do not split over 2"),
    ((_t(48, 4, 16), _t(48, 1, 16), _t(48, 1, 16)), r"key/value: 1 kv heads do not split over 2"),
    ((_t(48, 4, 16), _t(48, 2, 16), _t(48, 2, 16)), r"enable_gqa=True"),
    ((_t(48, 4, 16), _t(48, 4, 16), _t(40, 4, 16)), r"key/value: expected the same"),
    ((_t(48, 64), _t(48, 4, 16), _t(48, 4, 16)), r"query: expected this rank's shard.*\(48, 64\)"),
])
def test_validation_shapes(args, match):
    with pytest.raises(ValueError, match=match):
        _validate(*args, 2, 0, None, None, 0.0, False, None)


def test_validation_shards_dropout_rotary():
    q = _t(48, 4, 16)
    assert _validate(q, q, q, 2, 1, None, None, 0.0, False, None) == ((48, 48), (48, 48))
    assert _validate(q, q, q, 2, 1, (50, 48), None, 0.0, False, None) == ((50, 48), (50, 48))
    with pytest.raises(ValueError, match=r"rank 0's entry is 50 but its query shard has 48"):
        _validate(q, q, q, 2, 0, (50, 46), None, 0.0, False, None)
    with pytest.raises(ValueError, match=r"one size per rank \(2 ranks\), got 3"):
        _validate(q, q, q, 2, 0, (48, 24, 24), None, 0.0, False, None)
    with pytest.raises(ValueError, match=r"Python ints"):
        _validate(q, q, q, 2, 0, torch.tensor([48, 48]), None, 0.0, False, None)
    with pytest.raises(ValueError, match=r"dropout_p=0.1: not supported"):
        _validate(q, q, q, 2, 0, None, None, 0.1, False, None)
    with pytest.raises(ValueError, match=r"rotary cos: expected the GLOBAL table, \(96, D\).*\(48, 8\)"):
        _validate(q, q, q, 2, 0, None, None, 0.0, False, (_t(48, 8), _t(48, 8)))
    _validate(q, q, q, 2, 0, None, None, 0.0, False, (_t(96, 8), _t(96, 8)))


def test_needs_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = _t(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="not initialised"):
        ulysses_attention_varlen(q, q, q, cu, cu)
