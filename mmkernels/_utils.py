"""Small helpers shared by the op layers (no torch device queries at import)."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

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


def masks_keys_only(mask: torch.Tensor, shape: tuple) -> bool:
    """Whether ``mask`` broadcast to ``shape`` (B, H, Lq, Lk) masks keys only: the same for every
    head and query (a (B, 1, 1, Lk) padding mask, or an expanded view with stride 0 there) —
    the attention kernels read such a mask once per key, not per score."""
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(shape)
    return all(m.stride(i) == 0 or m.shape[i] == 1 for i in (1, 2))


def check_dropout_and_scale(dropout_p, scale, allow_one: bool = False) -> None:
    """The SDPA-style ``dropout_p`` in [0, 1) (``allow_one``: [0, 1], as SDPA itself takes) and
    ``scale`` float-or-None arguments."""
    ok = isinstance(dropout_p, (int, float)) and 0.0 <= float(dropout_p) <= 1.0
    if not ok or (not allow_one and float(dropout_p) == 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, {'1]' if allow_one else '1)'}, got {dropout_p!r}")
    numeric = (int, float, torch.SymInt, torch.SymFloat)
    if scale is not None and (not isinstance(scale, numeric) or isinstance(scale, bool)):
        raise ValueError(f"scale: expected a float or None, got {type(scale).__name__}")
    # a symbolic scale (a module's float attribute under torch.compile(dynamic=True)) is not read
    # on the host: float() of it would graph-break
    if (scale is not None and isinstance(scale, (int, float)) and not torch.compiler.is_compiling()
            and not math.isfinite(float(scale))):
        raise ValueError(f"scale: expected a finite float (or None for 1/sqrt(D)), got {scale!r}")


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (~1.7 s) at
    ``import mmkernels``: that decorator only sets this attribute, which dynamo reads when it traces
    a call (tests/test_package.py checks that it still does)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


_TRITON_ERR: list = []  # [None | str] once computed (a plain global: torch.compile reads it without tracing the import)
_TRITON_FOUND = importlib.util.find_spec("triton") is not None  # at import: finds the package, imports nothing


@assume_constant_result
def triton_import_error() -> str | None:
    """None when ``import triton`` works, else why not (cached).  While torch.compile traces (the
    first mmkernels call of a process may be inside a compiled, checkpointed region, where dynamo
    refuses the cache's side effect) it answers from ``find_spec`` alone, without caching: the
    eager calls check the import.  A constant for dynamo (no guard on the cache: a compiled
    first call followed by an eager one would otherwise recompile the compiled function)."""
    if not _TRITON_ERR:
        err = None
        if not _TRITON_FOUND:
            err = "the triton package is not installed"
        elif torch.compiler.is_compiling():
            return None
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


#: what every fused kernel of this package computes in (float64 goes to SDPA / the reference)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernel_reasons(lead: torch.Tensor, *, head_dim: int | None = None, max_head_dim: int = 256,
                   min_head_dim: int | None = None, nonempty: tuple = ()) -> list[str]:
    """Why no fused kernel takes a call, in the same words for every op: ``lead``'s dtype is not one
    of :data:`KERNEL_DTYPES` (``lead``: the tensor whose dtype and device the op's others share),
    ``head_dim`` is above ``max_head_dim`` (or below ``min_head_dim``), a tensor of ``nonempty`` is
    empty."""
    reasons = []
    if lead.dtype not in KERNEL_DTYPES:
        reasons.append(f"dtype {lead.dtype} (supported: float16, bfloat16, float32)")
    low = head_dim if min_head_dim is None else min_head_dim
    if head_dim is not None and not low <= head_dim <= max_head_dim:
        span = f"up to {max_head_dim}" if min_head_dim is None else f"{min_head_dim} to {max_head_dim}"
        reasons.append(f"head dim {head_dim} (supported: {span})")
    if any(0 in t.shape for t in nonempty):
        reasons.append("an empty tensor")
    return reasons


def triton_reasons(lead: torch.Tensor, **limits) -> list:
    """A Triton backend's reasons shared by every op: :func:`triton_device_reason` of ``lead`` and
    :func:`kernel_reasons` (``limits``: its keywords).  The op's check adds what only its kernels
    cannot do; a device reason alone is what the dispatcher reports (see :class:`mmkernels.dispatch.Backend`)."""
    device = triton_device_reason(lead)
    return ([] if device is None else [device]) + kernel_reasons(lead, **limits)


def rotary_reasons(rotary, query: torch.Tensor, value: torch.Tensor) -> list[str]:
    """What the Triton kernels' fused RoPE (``rotary=(cos, sin)`` of attention and attention_varlen)
    cannot do."""
    if rotary is None:
        return []
    reasons = []
    if any(t.requires_grad for t in rotary):
        reasons.append("rotary cos/sin that require grad (their gradients are not computed)")
    if value.shape[-1] > query.shape[-1]:
        reasons.append("rotary with Dv > D (the kernels would zero-pad the rotated head dim)")
    return reasons


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


def cu_seqlens_problems(cu: torch.Tensor, total: int, max_seqlen: int | None) -> torch.Tensor:
    """A 0-dim bool tensor on ``cu``'s device: True when ``cu`` is *not* a valid prefix-sum
    tensor of at most ``total`` rows (first entry 0, non-decreasing, last entry <= ``total``:
    the rows past it are padding) or a length exceeds the ``max_seqlen`` hint.  Device ops only:
    no host read."""
    steps = cu[1:] - cu[:-1]
    bad = (cu[0] != 0) | (cu[-1] > total) | (steps < 0).any()
    if max_seqlen is not None:
        bad = bad | (steps > max_seqlen).any()
    return bad


def safe_cu_seqlens(cu: torch.Tensor, total: int) -> torch.Tensor:
    """``cu_seqlens`` (n+1,) made safe to index a packed tensor of ``total`` rows, on the device
    (no host read, CUDA-graph capturable): contiguous int32 (n+2,), every boundary clamped to
    ``[0, total]`` and non-decreasing (a running max), the first one 0, and ``total`` appended.

    Valid prefix sums keep their n sequences and gain one trailing sequence: the rows past the
    last boundary (the padding tail of a CUDA-graph buffer; empty when ``cu[-1] == total``),
    which ``attention_varlen`` treats as padding (its rows see no key).  For any other integer
    tensor of the right shape the kernels still read and write only inside their tensors and
    every row belongs to exactly one sequence (the rows before ``cu[0]`` join sequence 0), so
    every output element is written.  The op reports the invalid values separately
    (:func:`cu_seqlens_problems`)."""
    c = torch.cummax(cu.clamp(0, total), 0).values
    return torch.cat([c.new_zeros(1), c[1:], c.new_full((1,), total)]).to(torch.int32)
