"""Make the Triton interpreter's fp32 <-> bf16 casts do what a GPU does (test-time patch).

Triton's interpreter (seen in 3.6.0 and 3.9.0) stores bf16 as uint16 and converts fp32 -> bf16
in ``InterpreterBuilder.cast_impl`` with ``_convert_float(..., rounding_mode=None)``: it
truncates (round toward zero), where a GPU's ``cvt.rn.bf16.f32`` rounds to nearest even.  Every
``x.to(tl.bfloat16)`` and every ``tl.store`` of an fp32 value into a bf16 pointer goes through
it (``fp_trunc`` -> ``cast_impl``), so every bf16 output and every bf16 P / dS tile fed to a dot
is biased toward zero by up to 1 ulp — in CI only.  Measured on the attention kernels (L=512,
d=128, causal + float bias, bf16, max abs error vs float64): O 0.0151 stock vs 0.0076 patched,
dV 0.0346 vs 0.0120 (an FA-style emulation: 0.0076, 0.0120); see ``docs/interpreter_bf16.md``.

The same function also gets wrong (3.9.0, checked bit for bit against torch; 3.6.0 has the same code):
- fp32 subnormals -> bf16: wrong values (not even truncated);
- NaN whose payload sits in the low 16 bits -> bf16 +-inf;
- bf16 subnormals -> fp32: wrong values (0x0001 -> 0, 0x0003 -> 0x00400000).
All three are fixed here too (exact upcast, NaN stays NaN).  fp32 -> fp16 is numpy's
``astype(np.float16)``: already round to nearest even, left alone.

:func:`install` replaces ``InterpreterBuilder.cast_impl`` (the class attribute: every builder,
also those made later, and the ``create_fp_trunc`` / ``create_fp_ext`` lambdas that call it)
with a wrapper that handles fp32 <-> bf16 and hands every other pair to the original.  It
checks the result on probe values before it keeps the patch, and does nothing (returning a
sentence saying why) when:
- ``MMK_INTERPRETER_RTZ=1`` (keep the stock round-toward-zero casts, e.g. to measure them);
- ``TRITON_INTERPRET`` is not set (CUDA runs compiled kernels: nothing to patch);
- the interpreter internals it needs are absent or the stock cast already rounds to nearest.

Outside pytest (a script that compares bf16 results in the interpreter)::

    import sys; sys.path.insert(0, "tests")
    import _interpreter_rounding; print(_interpreter_rounding.install())
"""

from __future__ import annotations

import os

import numpy as np

ENV_KEEP_RTZ = "MMK_INTERPRETER_RTZ"

# NaN -> CUDA's canonical bf16 NaN (CUDART_NAN_BF16 = 0x7FFF).  Torch's CPU ``.to(torch.bfloat16)``
# writes 0xFFFF (AVX2 path) or 0x7FC0 (scalar c10 code): the bit test compares NaN-ness for NaNs.
BF16_NAN = np.uint16(0x7FFF)

_state: dict = {"status": None, "original": None}


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 array -> bf16 bit patterns (uint16, same shape), rounded to nearest, ties to even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # adding 0x7FFF plus the kept part's lowest bit rounds to nearest even in one integer add;
    # a carry out of the mantissa bumps the exponent (FLT_MAX -> inf), as IEEE rounding does.
    # Only NaNs can wrap around 2**32 here, and they are replaced below.
    with np.errstate(over="ignore"):
        r = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, BF16_NAN, r).reshape(np.shape(x))


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> fp32, exact (subnormals included)."""
    shape = np.shape(b)
    b = np.ascontiguousarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(shape)


def _probe_bits() -> np.ndarray:
    """fp32 probe values whose bf16 rounding tells RTZ, RNE and the special cases apart."""
    return np.array([
        0x3F808000,  # 1 + 2^-8: tie, kept part even -> stays 0x3F80
        0x3F818000,  # tie, kept part odd -> rounds up to 0x3F82
        0x3F808001,  # just above a tie -> up
        0xBF80C000,  # negative, above half -> away from zero
        0x7F7FFFFF,  # FLT_MAX -> +inf
        0x00012345,  # subnormal
        0x80000000,  # -0
        0x7F800000, 0xFF800000,  # +-inf
    ], dtype=np.uint32)


def _expected_bf16(bits: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(bits.view(np.float32).copy())
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def install() -> str:
    """Patch the interpreter's fp32 <-> bf16 casts (idempotent); returns a one-line status."""
    if _state["status"] is not None:
        return _state["status"]
    _state["status"] = status = _install()
    return status


def _install() -> str:
    if os.environ.get(ENV_KEEP_RTZ, "0").strip().lower() in ("1", "true", "yes", "on"):
        return f"stock interpreter casts kept ({ENV_KEEP_RTZ}=1: fp32->bf16 rounds toward zero)"
    if not _interpreting():
        return "not patched: TRITON_INTERPRET is not set (compiled kernels round on the device)"
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter as interp

        builder_cls = interp.InterpreterBuilder
        handle_cls = interp.TensorHandle
        original = builder_cls.cast_impl
        bf16, fp32 = tl.bfloat16, tl.float32
    except Exception as exc:  # another triton layout: leave it alone
        return f"not patched: triton interpreter internals not found ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "?")

    probe = _probe_bits()
    want = _expected_bf16(probe)
    try:
        stock = original(builder_cls(), handle_cls(probe.view(np.float32).copy(), fp32), bf16).data.view(np.uint16)
    except Exception as exc:
        return f"not patched: triton {version} interpreter cast_impl probe failed ({type(exc).__name__}: {exc})"
    if np.array_equal(stock, want):
        return f"not patched: triton {version} interpreter already rounds fp32->bf16 to nearest even"

    def cast_impl(self, src, dst_type):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if src_ty == fp32 and dst_ty == bf16:
            return handle_cls(f32_to_bf16_bits(src.data), bf16)
        if src_ty == bf16 and dst_ty == fp32:
            return handle_cls(bf16_bits_to_f32(src.data), fp32)
        return original(self, src, dst_type)

    cast_impl.__wrapped__ = original
    builder_cls.cast_impl = cast_impl
    got = builder_cls().cast_impl(handle_cls(probe.view(np.float32).copy(), fp32), bf16).data.view(np.uint16)
    if not np.array_equal(got, want):
        builder_cls.cast_impl = original
        return f"not patched: triton {version} patched cast disagreed with torch on probe values"
    _state["original"] = (builder_cls, original)
    return f"patched: triton {version} interpreter fp32<->bf16 casts round to nearest even, as on a GPU " \
           f"({ENV_KEEP_RTZ}=1 keeps the stock round-toward-zero)"


def uninstall() -> None:
    """Restore the stock cast (tests that measure the stock behaviour use it)."""
    if _state["original"] is not None:
        builder_cls, original = _state["original"]
        builder_cls.cast_impl = original
        _state["original"] = None
    _state["status"] = None


def active() -> bool:
    """Whether the nearest-even cast is installed now."""
    return _state["original"] is not None
