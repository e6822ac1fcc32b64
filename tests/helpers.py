"""Shared test helpers: tolerance rule, error reporting, poisoning."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

# Additive floor on top of the 2x rule, per dtype: a few ulps of the tensor's largest element
# (relative to max(1, |ref|.max())).  It only matters when plain PyTorch happens to be exact.
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def worst(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, tuple]:
    """Max abs error and the index where it occurs (NaN anywhere counts as infinite)."""
    err = (actual.double() - expected.double()).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    idx = int(err.argmax())
    return float(err.max()), tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), err.shape))


def assert_close_rule(name: str, actual: torch.Tensor, ref64: torch.Tensor, same_dtype_ref: torch.Tensor,
                      factor: float = 2.0) -> None:
    """flash-attn's rule: error(actual) <= factor * error(plain PyTorch in actual's dtype) + floor."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    err, idx = worst(actual, ref64)
    base, _ = worst(same_dtype_ref, ref64)
    floor = FLOOR[actual.dtype] * max(1.0, float(ref64.abs().max()))
    bound = factor * base + floor
    assert err <= bound, (
        f"{name}: max abs error {err:.3g} at {idx} (got {float(actual[idx]):.6g}, "
        f"expected {float(ref64[idx]):.6g}) > {factor}x PyTorch {actual.dtype} error {base:.3g} + {floor:.3g}"
    )


def assert_close_abs(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, idx = worst(actual, expected)
    assert err <= atol, (
        f"{name}: max abs error {err:.3g} at {idx} (got {float(actual[idx]):.6g}, "
        f"expected {float(expected[idx]):.6g}) > atol {atol:g}"
    )


@contextmanager
def poisoned():
    """Kernel outputs start as NaN, so an element the kernel forgot to write fails the comparison."""
    old = os.environ.get("MMKERNELS_POISON")
    os.environ["MMKERNELS_POISON"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MMKERNELS_POISON"]
        else:
            os.environ["MMKERNELS_POISON"] = old


def triton_has_cuda_backend() -> bool:
    """Whether triton can compile for NVIDIA GPUs here (no GPU needed: ptxas ships with triton)."""
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except Exception:
        return False
