"""The fp32 -> bf16 cast that Triton kernels run in CI equals torch's ``.to(torch.bfloat16)`` bit for bit.

The interpreter's stock cast rounds toward zero (``tests/_interpreter_rounding.py``,
``docs/interpreter_bf16.md``); ``tests/conftest.py`` patches it to round to nearest even, as a
GPU's ``cvt.rn.bf16.f32`` does.  On CUDA the same kernels check the compiled casts.

NaN: compared as NaN-ness only (torch writes 0xFFFF or 0x7FC0 depending on its CPU code path;
PTX writes the canonical 0x7FFF).
"""

from __future__ import annotations

import os

import _interpreter_rounding as rounding
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, HAS_CUDA

KEEP_RTZ = os.environ.get(rounding.ENV_KEEP_RTZ, "0") not in ("0", "")
pytestmark = pytest.mark.skipif(KEEP_RTZ, reason=f"{rounding.ENV_KEEP_RTZ}=1: stock interpreter casts kept on purpose")

BLOCK = 1024


@triton.jit
def _cast_kernel(X, Y, N, VIA_STORE: tl.constexpr, BLOCK: tl.constexpr):
    """Y[i] = X[i] in Y's dtype: an explicit ``.to`` or the implicit cast of ``tl.store``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    x = tl.load(X + offs, mask=ok)
    if VIA_STORE:
        tl.store(Y + offs, x, mask=ok)
    else:
        tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=ok)


def _cast(x: torch.Tensor, dtype: torch.dtype, via_store: bool) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    _cast_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, y, x.numel(), VIA_STORE=via_store, BLOCK=BLOCK)
    return y


def _f32(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint32).view(np.float32).copy())


def _fp32_cases() -> dict[str, torch.Tensor]:
    """Named fp32 inputs: every rounding case of fp32 -> bf16/fp16."""
    rng = np.random.default_rng(22)
    hi = rng.integers(0, 1 << 16, 4096, dtype=np.uint32) << 16  # random bf16 values (any sign/exponent)
    cases = {
        "random_bits": rng.integers(0, 1 << 32, 100_000, dtype=np.uint64).astype(np.uint32),
        "normal_randn": np.concatenate([rng.standard_normal(50_000), rng.standard_normal(20_000) * 1e30,
                                        rng.standard_normal(20_000) * 1e-30]).astype(np.float32).view(np.uint32),
        # exactly halfway between two bf16 neighbours: kept part even (0x...0) and odd (0x...1)
        "ties_even": (hi & ~np.uint32(0x10000)) | 0x8000,
        "ties_odd": hi | 0x18000,
        "just_below_tie": (hi & ~np.uint32(0x10000)) | 0x7FFF,
        "just_above_tie": (hi & ~np.uint32(0x10000)) | 0x8001,
        "subnormals": np.concatenate([rng.integers(1, 1 << 23, 20_000, dtype=np.uint32),
                                      np.array([1, 0x7FFF, 0x8000, 0x8001, 0x18000, 0x7FFFFF, 0x7F8000, 0x7FC000],
                                               dtype=np.uint32)]),
        # FLT_MAX and its neighbours round up to inf; 0x7F7F7FFF stays finite
        "to_inf": np.array([0x7F7FFFFF, 0x7F7F8000, 0x7F7FC000, 0x7F7F7FFF, 0xFF7FFFFF, 0xFF7F8000], dtype=np.uint32),
        "zeros_infs": np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000], dtype=np.uint32),
        "nans": np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7F80FFFF, 0x7FFFFFFF, 0xFFFFFFFF,
                          0x7FBF8000], dtype=np.uint32),
    }
    out = {}
    for name, bits in cases.items():
        bits = np.asarray(bits, dtype=np.uint32)
        out[name] = torch.cat([_f32(bits), -_f32(bits)]) if name == "subnormals" else _f32(bits)
    return out


CASES = _fp32_cases()


def _bits16(t: torch.Tensor) -> np.ndarray:
    return t.cpu().view(torch.int16).numpy().view(np.uint16)


def _assert_same_bits(name: str, got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> None:
    nan = torch.isnan(want.float()).cpu().numpy()
    assert np.array_equal(np.isnan(got.float().cpu().numpy()), nan), f"{name}: NaN pattern differs"
    g, w = _bits16(got)[~nan], _bits16(want)[~nan]
    bad = np.flatnonzero(g != w)
    if bad.size:
        xb = x.cpu().numpy().view(np.uint32)[~nan]
        i = bad[0]
        pytest.fail(f"{name}: {bad.size} of {g.size} casts differ from torch, first: fp32 0x{xb[i]:08X} -> "
                    f"0x{g[i]:04X}, torch 0x{w[i]:04X}")


def test_patch_installed():
    import conftest

    if HAS_CUDA:
        assert not rounding.active(), conftest.BF16_ROUNDING
    else:
        assert rounding.active(), conftest.BF16_ROUNDING


@pytest.mark.parametrize("via_store", [False, True], ids=["to", "store"])
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_to_bf16_bits(case, via_store):
    """``x.to(tl.bfloat16)`` and ``tl.store(bf16_ptr, fp32)`` give torch's bits (round to nearest even)."""
    x = CASES[case]
    got = _cast(x.to(DEVICE), torch.bfloat16, via_store)
    _assert_same_bits(case, got, x.to(torch.bfloat16), x)


@pytest.mark.parametrize("case", ["random_bits", "normal_randn", "ties_even", "subnormals", "to_inf", "nans"])
def test_fp32_to_fp16_bits(case):
    """fp32 -> fp16 (numpy's astype in the interpreter; not patched) already rounds to nearest even."""
    x = CASES[case]
    with np.errstate(all="ignore"):
        got = _cast(x.to(DEVICE), torch.float16, False)
    _assert_same_bits(case, got, x.to(torch.float16), x)


def test_bf16_to_fp32_exact():
    """Every bf16 bit pattern (subnormals included) widens exactly."""
    b = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    got = _cast(b.to(DEVICE), torch.float32, False).cpu()
    want = b.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_stock_interpreter_truncates():
    """What the patch replaces (documents the interpreter's behaviour; skips once triton fixes it)."""
    if not rounding.active():
        pytest.skip("patch not active here: " + rounding.install())
    from triton.runtime import interpreter as interp

    stock = interp.InterpreterBuilder.cast_impl.__wrapped__
    x = CASES["ties_odd"].numpy()
    got = stock(interp.InterpreterBuilder(), interp.TensorHandle(x, tl.float32), tl.bfloat16).data.view(np.uint16)
    bits = x.view(np.uint32)
    exponent = (bits >> 23) & 0xFF
    normal = (exponent != 0) & (exponent != 0xFF)  # the stock cast also mangles subnormals (see the module)
    np.testing.assert_array_equal(got[normal], (bits[normal] >> 16).astype(np.uint16))  # round toward zero
