"""Small helpers shared by the op layers (no torch device queries at import)."""

from __future__ import annotations

import importlib.util
import os

import torch


def describe(t: torch.Tensor) -> str:
    """``shape=(2, 3), dtype=torch.float16, device=cuda:0`` for error messages."""
    return f"shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device}"


def broadcasts_to(mask: torch.Tensor, target: tuple) -> bool:
    """True when ``mask`` broadcasts to exactly ``target`` (e.g. (B, H, Lq, Lk)) without adding dims to it."""
    if mask.dim() > len(target):
        return False
    try:
        return torch.broadcast_shapes(mask.shape, target) == torch.Size(target)
    except RuntimeError:
        return False


def check_dropout_and_scale(dropout_p, scale, allow_one: bool = False) -> None:
    """The SDPA-style ``dropout_p`` in [0, 1) (``allow_one``: [0, 1], as SDPA itself takes) and
    ``scale`` float-or-None arguments."""
    ok = isinstance(dropout_p, (int, float)) and 0.0 <= float(dropout_p) <= 1.0
    if not ok or (not allow_one and float(dropout_p) == 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, {'1]' if allow_one else '1)'}, got {dropout_p!r}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a float or None, got {type(scale).__name__}")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_TRITON_ERR: list = []  # [None | str] once computed (a plain global: torch.compile reads it without tracing the import)


def triton_import_error() -> str | None:
    """None when ``import triton`` works, else why not (cached)."""
    if not _TRITON_ERR:
        err = None
        if importlib.util.find_spec("triton") is None:
            err = "the triton package is not installed"
        else:
            try:
                import triton  # noqa: F401
                import triton.language  # noqa: F401
            except Exception as exc:  # pragma: no cover - broken installs
                err = f"import triton failed: {exc!r}"
        _TRITON_ERR.append(err)
    return _TRITON_ERR[0]


def triton_device_reason(t: torch.Tensor):
    """Why a Triton kernel cannot run on ``t``'s device (None: it can)."""
    from .dispatch import Reason

    err = triton_import_error()
    if err is not None:
        return Reason(err, expected=True)
    if t.device.type == "cuda":
        return None
    if t.device.type == "cpu":
        if interpreting():
            return None
        return Reason("CPU tensors run Triton kernels only with TRITON_INTERPRET=1", expected=True)
    return Reason(f"device {t.device.type!r} is not supported by the Triton kernels", expected=True)


def poisoning() -> bool:
    """``MMKERNELS_POISON=1``: fill kernel outputs with NaN before launch (tests use it to
    prove every element is written)."""
    return os.environ.get("MMKERNELS_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Uninitialised output buffer, NaN-poisoned under ``MMKERNELS_POISON=1``."""
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def contiguous_outputs(*tensors: torch.Tensor) -> tuple:
    """The tensors, each contiguous (a no-op when it already is).

    A custom op's real kernel and its fake must agree on output strides, or inductor's
    ``assert_size_stride`` fails at run time (seen with transposed HF-layout inputs, whose
    ``empty_like`` keeps the permuted strides).  Every op of this package returns contiguous
    outputs, and its fake returns :func:`empty_contiguous` of the same shapes.
    """
    return tuple(t.contiguous() for t in tensors)


def empty_contiguous(t: torch.Tensor) -> torch.Tensor:
    """A contiguous empty tensor with ``t``'s shape, dtype and device (for fake kernels)."""
    return t.new_empty(t.shape)


def check_gqa_heads(hq: int, hkv: int, enable_gqa: bool, key: torch.Tensor) -> None:
    """SDPA's grouped-query rule: Hkv != Hq needs ``enable_gqa`` and Hq % Hkv == 0."""
    if hkv == hq:
        return
    if not enable_gqa:
        raise ValueError(f"key: query has {hq} heads but key has {hkv} ({describe(key)}); "
                         "pass enable_gqa=True for grouped-query attention")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"key: query heads ({hq}) must be a multiple of key/value heads, got {describe(key)}")


def check_rotary_tensor(name: str, t, query: torch.Tensor) -> None:
    """One of a ``rotary=(cos, sin)`` pair: a floating tensor on the query's device (shapes are
    the caller's: they depend on the layout)."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating tensor, got "
                         f"{describe(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if t.device != query.device:
        raise ValueError(f"{name}: expected device {query.device} like query, got {describe(t)}")
