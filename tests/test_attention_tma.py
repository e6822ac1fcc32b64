"""The tensor-descriptor (TMA) main loops of the attention kernels (``USE_TMA`` candidates).

On a GPU the autotuner picks them; here ``attention._FORCE_TMA`` makes every launch run them
(in the interpreter, or untuned on a GPU; where the operands meet TMA's preconditions, as the
autotuner's TMA candidates do), and a spy on each kernel's launch
checks that the TMA path really ran — a test of the TMA loads cannot pass on the pointer loads.
Outputs are NaN-poisoned and compared with float64 (2x-PyTorch rule); with dropout (whose own
test is a probe) the TMA run must equal the pointer run bit for bit: the tiles hold the same
values either way.  Compiling the TMA candidates for sm_90 is in test_inspect.py.
"""

from __future__ import annotations

import contextvars

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close_rule, poisoned
from test_attention import _inputs, check

import mmkernels as mk
from mmkernels.kernels import _tma
from mmkernels.kernels import attention as A

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_KINDS = ("fwd", "dkdv", "dq")


@pytest.fixture
def tma_path(monkeypatch):
    """Run the interpreter's launches with USE_TMA; yields {kind: [USE_TMA of each launch]}."""
    seen: dict = {kind: [] for kind in _KINDS}
    monkeypatch.setattr(A, "_FORCE_TMA", True)
    for kind in _KINDS:
        kernel = A._KERNELS[kind]

        def spy(*args, _run=kernel.run, _kind=kind, **kwargs):
            seen[_kind].append(bool(kwargs.get("USE_TMA", False)))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    return seen


def _tma_kinds(seen) -> set:
    return {kind for kind, flags in seen.items() if flags and all(flags)}


# (B, Hq, Hkv, Lq, Lk, D, dtype, causal, mask, HF-transposed layout)
CASES = [
    (2, 2, 2, 17, 113, 88, torch.bfloat16, False, False, False),
    (1, 2, 2, 113, 113, 72, torch.float16, True, False, False),
    (2, 1, 1, 1, 257, 64, torch.float16, False, False, False),
    (2, 4, 2, 57, 113, 88, torch.bfloat16, False, True, False),   # GQA + padding mask
    (1, 2, 2, 113, 17, 72, torch.float16, True, False, True),      # (B, L, H, D) views, causal Lq > Lk
    (1, 1, 1, 1, 1, 88, torch.bfloat16, False, False, False),
]


def _case_id(c):
    b, hq, hkv, lq, lk, d, dtype, causal, mask, tr = c
    name = f"{str(dtype)[6:]}-H{hq}/{hkv}-{lq}x{lk}-d{d}"
    return name + ("-causal" if causal else "") + ("-mask" if mask else "") + ("-BLHD" if tr else "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_tma_loops_match_float64(tma_path, case):
    b, hq, hkv, lq, lk, d, dtype, causal, use_mask, transposed = case
    q, k, v = _inputs(b, hq, hkv, lq, lk, d, dtype, transposed=transposed)
    kw = dict(is_causal=causal, enable_gqa=hq != hkv)
    if use_mask:
        kw["attn_mask"] = torch.rand(b, 1, 1, lk, device=DEVICE) > 0.3
    check(q, k, v, **kw)
    assert _tma_kinds(tma_path) == set(_KINDS), tma_path


def _run(q, k, v, seed, **kw):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    torch.manual_seed(seed)
    with poisoned(), mk.use_backend("triton"):
        out = mk.attention(q, k, v, **kw)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out, grads


def _same_as_pointer_loads(monkeypatch, seen, q, k, v, **kw):
    out, grads = _run(q, k, v, 7, **kw)
    assert _tma_kinds(seen) == set(_KINDS), seen
    monkeypatch.setattr(A, "_FORCE_TMA", False)
    out_ptr, grads_ptr = _run(q, k, v, 7, **kw)
    assert torch.equal(out, out_ptr)
    for name, g, g_ptr in zip(("dq", "dk", "dv"), grads, grads_ptr):
        assert torch.equal(g, g_ptr), name


@pytest.mark.skipif(DEVICE != "cpu", reason="bit-equality needs the same tiles: the interpreter's fixed ones")
def test_tma_dropout_mask_gqa_causal_equal_pointer_loads(tma_path, monkeypatch):
    """Dropout's Philox stream does not depend on how K/V arrive, and the tiles hold the same
    values either way: results bit-identical to the pointer loads (whose dropout test_attention
    checks with its V = I probe)."""
    q, k, v = _inputs(1, 4, 2, 45, 77, 88, torch.float16)
    mask = torch.rand(1, 1, 45, 77, device=DEVICE) > 0.2
    _same_as_pointer_loads(monkeypatch, tma_path, q, k, v, attn_mask=mask, is_causal=True, enable_gqa=True,
                           dropout_p=0.3)


@pytest.mark.parametrize("what", ["152-byte-rows", "fp32", "d136"])
def test_no_tma_where_not_offered(tma_path, what):
    """No TMA launch where it is not offered, and the pointer loads are right: rows of 76 bf16
    elements (152 bytes) break TMA's 16-byte stride rule (the backward's dO is contiguous, but
    dK/dV also reads Q); fp32 and d > 128 have no TMA candidates (``_tma_offered``)."""
    if what == "152-byte-rows":
        q, k, v = (torch.randn(1, 2, 40, 76, device=DEVICE, dtype=torch.bfloat16)[..., :72].requires_grad_()
                   for _ in range(3))
    else:
        q, k, v = _inputs(1, 1, 1, 17, 40, 136 if what == "d136" else 64,
                          torch.float32 if what == "fp32" else torch.float16)
        assert _tma.tma_ok(q, k, v)
    check(q, k, v)
    assert tma_path == {kind: [False] for kind in _KINDS}


def test_rotary_runs_the_plain_loops_tma_included(tma_path):
    """Rotary rotates Q and K once into contiguous copies, so the loops are the plain ones and
    their TMA candidates apply (d=80 fp16 rows are 160 bytes: TMA-compatible); right either way."""
    q, k, v = _inputs(1, 2, 2, 33, 33, 80, torch.float16)
    freq = torch.arange(33, device=DEVICE, dtype=torch.float64)[:, None] * torch.rand(40, device=DEVICE)[None, :]
    cos, sin = (torch.cat([f, f], -1) for f in (freq.cos(), freq.sin()))
    with poisoned():
        out = mk.attention(q, k, v, rotary=(cos.half(), sin.half()), is_causal=True, backend="triton")
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), do)
    assert tma_path == {kind: [True] for kind in _KINDS}
    for cast in (torch.float64, torch.float16):
        qc, kc, vc = (x.detach().to(cast).requires_grad_() for x in (q, k, v))
        ref = mk.attention(qc, kc, vc, rotary=(cos.to(cast), sin.to(cast)), is_causal=True, backend="reference")
        ref_grads = torch.autograd.grad(ref, (qc, kc, vc), do.to(cast))
        if cast == torch.float64:
            out64, grads64 = ref, ref_grads
    assert_close_rule("out", out, out64, ref, 2.0)
    for name, g, g64, g16 in zip(("dq", "dk", "dv"), grads, grads64, ref_grads):
        assert_close_rule(name, g, g64, g16, 2.0)


def test_no_tma_candidates_for_fp32_or_large_head_dims():
    for kind in _KINDS:
        for d, dtype in ((64, torch.float32), (136, torch.bfloat16), (256, torch.float16)):
            assert not any(c.kwargs.get("USE_TMA") for c in A._gpu_configs(kind, d, dtype, tma=True))


def test_tma_ok_preconditions():
    x = torch.randn(2, 3, 17, 88, dtype=torch.bfloat16)
    assert _tma.tma_ok(x)
    assert _tma.tma_ok(torch.randn(2, 17, 3, 72, dtype=torch.float16).transpose(1, 2))  # HF layout: 216-wide rows
    assert not _tma.tma_ok(torch.randn(2, 3, 17, 76, dtype=torch.bfloat16)[..., :72])  # 152-byte rows
    assert _tma.tma_ok(torch.randn(2, 3, 17, 76, dtype=torch.float32)[..., :72])       # 304-byte rows
    assert not _tma.tma_ok(torch.randn(2, 3, 17, 20, dtype=torch.bfloat16))            # 40-byte rows
    assert _tma.tma_ok(torch.randn(2, 3, 17, 20, dtype=torch.float32))                 # 80-byte rows
    assert not _tma.tma_ok(torch.randn(2 * 3 * 17 * 88 + 1, dtype=torch.bfloat16)[1:].view(2, 3, 17, 88))  # base
    assert not _tma.tma_ok(x.transpose(-1, -2))                                        # last stride != 1
    assert not _tma.tma_ok(x.double())


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (88, torch.float16), (128, torch.bfloat16)])
def test_tma_candidates_follow_the_default(kind, d, dtype):
    def key(c):
        return c.kwargs, c.num_warps, c.num_stages

    base = [key(c) for c in A._gpu_configs(kind, d, dtype)]
    with_tma = [key(c) for c in A._gpu_configs(kind, d, dtype, tma=True)]
    assert not any(kw.get("USE_TMA") for kw, _, _ in base)
    assert with_tma[:len(base)] == base  # the untuned default stays the first pointer-load config
    extra = with_tma[len(base):]
    assert 1 <= len(extra) <= A._TMA_TRIES and all(kw["USE_TMA"] for kw, _, _ in extra)
    # TMA versions of kept pointer tiles, each tile shape once
    tiles = [(kw["BLOCK_M"], kw["BLOCK_N"]) for kw, _, _ in extra]
    assert len(set(tiles)) == len(tiles)
    assert set(tiles) <= {(kw["BLOCK_M"], kw["BLOCK_N"]) for kw, _, _ in base}


def test_allocator_installed_only_when_none_set():
    """TMA launches need Triton's scratch allocator: installed when unset, a user's one kept.
    Run in fresh contexts (Triton keeps it in a ContextVar); nothing is allocated here."""
    from triton.runtime import _allocation

    def fresh():
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        _tma.ensure_allocator()
        return _allocation._allocator.get()

    assert contextvars.copy_context().run(fresh) is _tma._cuda_scratch

    def users():
        mine = lambda size, alignment, stream: None  # noqa: E731
        _allocation._allocator.set(mine)
        _tma.ensure_allocator()
        return _allocation._allocator.get() is mine

    assert contextvars.copy_context().run(users)


def test_tma_only_for_sm90_and_newer():
    """On sm_80 descriptor loads compile to scalar loads: no TMA candidates there."""
    from mmkernels.kernels._launch import capture_launches

    cpu = torch.device("cpu")
    assert _tma.tma_target(cpu)  # the interpreter runs descriptors
    for arch, expected in ((80, False), (86, False), (90, True), (100, True)):
        with capture_launches(arch):
            assert _tma.tma_target(cpu) is expected, arch
