"""Tensor-descriptor (TMA) tile loads for the attention main loops, and their host-side checks.

On sm_90 a load through a tensor descriptor (``tl.make_tensor_descriptor``, Triton 3.6 and
later) becomes one ``cp.async.bulk.tensor`` per tile: the Tensor Memory Accelerator copies the
whole [rows, cols] box into shared memory, computes the addresses itself and fills rows and
columns outside the tensor with zeros — what the pointer loaders of :mod:`._tiles` do with a
register tile of addresses, a bounds mask and 16-byte ``cp.async`` per thread.  The kernels use
these loads only when the autotuner picks a configuration with ``USE_TMA=True`` (see
``attention._gpu_configs``); the tiles returned here are exactly the ones the pointer loaders
return (same shapes, zeros out of range), so the rest of the kernel does not change.

Descriptors are built on the device, one per (batch, head) matrix (L, D) a program reads: base
= the matrix's first element, shape [L, D], strides [row stride, 1], box [ROWS, chunk] for each
power-of-two head-dim chunk (D0, D1 of ``split_head_dim``: 88 → boxes of 64 and 32 columns at
columns 0 and 64; columns 88..95 come back as zeros).  A 2-D descriptor per matrix rather than one
4-D (B, H, L, D) descriptor: the kernels already hold each matrix's base pointer, the box is the
tile with no reshape, and the same loads fit the packed (varlen) layout.

TMA's preconditions, checked on the host by :func:`tma_ok` (and :func:`tma_target`: sm_90 or
newer) before a TMA candidate is offered (the hardware faults rather than falling back): base
address 16-byte aligned, unit last stride, every other stride a multiple of 16 bytes (8 elements
for fp16/bf16, 4 for fp32), and a box whose inner dimension is at least 16 bytes (D0, D1 >= 16
always hold).  A device-side descriptor
lives in a 128-byte global scratch buffer per program that Triton's launcher asks
``triton.set_allocator``'s allocator for: :func:`ensure_allocator` installs one (``torch.empty``
on the current CUDA device, where Triton launches) when none is set.  The interpreter needs none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import for_gpu, target_arch

_TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------
@triton.jit
def _row_descs(base, L, stride_r, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr):
    """Descriptors of the (L, HEAD_DIM) matrix at ``base`` (row stride ``stride_r``, unit column
    stride) with boxes [ROWS, D0] and [ROWS, D1] (D1 = 0: the second is the first again, unused)."""
    d0 = tl.make_tensor_descriptor(base, shape=[L, HEAD_DIM], strides=[stride_r, 1], block_shape=[ROWS, D0])
    d1 = d0
    if D1 > 0:
        d1 = tl.make_tensor_descriptor(base, shape=[L, HEAD_DIM], strides=[stride_r, 1], block_shape=[ROWS, D1])
    return d0, d1


@triton.jit
def _tma_rows2(d0, d1, start, D0: tl.constexpr, D1: tl.constexpr):
    """The two head-dim chunks [ROWS, D0], [ROWS, D1] of rows ``start``.. (as ``_load_rows2``:
    rows past L and columns past HEAD_DIM read 0)."""
    t0 = d0.load([start, 0])
    t1 = t0
    if D1 > 0:
        t1 = d1.load([start, D0])
    return t0, t1


@triton.jit
def _tma_cols2(d0, d1, start, D0: tl.constexpr, D1: tl.constexpr):
    """The transposed chunks [D0, ROWS], [D1, ROWS] (as ``_load_cols2``).  The transpose is a
    view of the shared-memory tile: wgmma reads its B operand either way round."""
    r0, r1 = _tma_rows2(d0, d1, start, D0, D1)
    t0 = tl.trans(r0)
    t1 = t0
    if D1 > 0:
        t1 = tl.trans(r1)
    return t0, t1


# --------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------
def tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether every (..., L, D) tensor meets TMA's preconditions for the row descriptors of
    :func:`_row_descs`: fp16/bf16/fp32, unit last stride, positive row stride, every other
    stride a multiple of 16 bytes, base address 16-byte aligned (so every (batch, head) matrix's
    base is aligned too)."""
    for t in tensors:
        if t.dtype not in _TMA_DTYPES or t.dim() < 2:
            return False
        esz = t.element_size()
        if t.stride(-1) != 1 or t.stride(-2) <= 0 or t.data_ptr() % 16:
            return False
        if any(st * esz % 16 for st in t.stride()[:-1]):
            return False
    return True


def tma_target(device: torch.device) -> bool:
    """Whether launches on ``device`` may use TMA: a GPU of compute capability 9.0 or newer (on
    sm_80 descriptor loads compile to scalar loads without cp.async: measured, forward d=88, 48-96
    2-byte loads), or the interpreter (which runs descriptors)."""
    if not for_gpu(device.type):
        return True
    return target_arch(device) >= 90


def _cuda_scratch(size: int, alignment: int, stream):
    # Triton launches on the current device and stream; torch's caching allocator returns
    # blocks aligned to 512 bytes (>= the 128 a descriptor needs) ordered on the current stream
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Install :func:`_cuda_scratch` as Triton's allocator unless the caller set one.

    Triton keeps the allocator in a ContextVar (per thread / asyncio context), so the check runs
    at every TMA-capable launch rather than once per process: it is one lookup."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_cuda_scratch)
