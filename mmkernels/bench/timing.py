"""Timing done right, on CUDA and on the CPU.

- CUDA: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed by zeroing
  a 256 MiB buffer before each call, gradients reset to None), median and 20/80 % quantiles.
- CPU: a ``perf_counter`` loop after a timed warm-up, same statistics.
- Rotating input sets: :func:`rotation_count` copies of a case's inputs add up to more than twice
  the L2 cache and :func:`cycle` uses the next copy on every call, so even without the flush no
  call reads operands that the previous call left in cache.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

__all__ = ["Timing", "cycle", "quantiles", "rotation_count", "sync", "time_fn"]

MIB = 1 << 20


@dataclass(frozen=True)
class Timing:
    """One call's time in milliseconds: median and 20/80 % quantiles of ``reps`` timed calls."""

    ms_p50: float
    ms_p20: float
    ms_p80: float
    timer: str
    reps: int | None = None

    def asdict(self) -> dict:
        return asdict(self)


def quantiles(xs: Sequence[float], qs: Sequence[float]) -> list[float]:
    """Linear interpolation between order statistics (numpy's and torch.quantile's default)."""
    xs = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def sync(device) -> None:
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


def reset_grads(ts) -> None:
    for t in ts:
        t.grad = None


def time_fn(fn: Callable[[], object], device, *, grads: Sequence = (), warmup_ms: float = 25.0,
            rep_ms: float = 100.0, min_reps: int = 5, max_reps: int = 1000) -> Timing:
    """Time ``fn()``; ``grads``: tensors whose ``.grad`` is reset to None before every call
    (a backward timing would otherwise include gradient accumulation)."""
    import torch

    if torch.device(device).type == "cuda":
        from triton.testing import do_bench  # triton >= 2.1: quantiles, grad_to_none

        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], grad_to_none=list(grads) or None)
        return Timing(*(float(x) for x in ms), "triton.testing.do_bench")
    t_end = time.perf_counter() + warmup_ms / 1e3
    while True:  # at least one warm-up call, whatever warmup_ms
        reset_grads(grads)
        fn()
        if time.perf_counter() >= t_end:
            break
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        reset_grads(grads)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(*quantiles(times, [0.5, 0.2, 0.8]), "perf_counter", len(times))


def rotation_count(set_bytes: int, device, *, max_sets: int = 32, max_total_bytes: int = 2 << 30) -> int:
    """How many copies of a ``set_bytes`` input set add up to more than twice the L2 cache (1 on
    the CPU and when one set alone is larger); capped by ``max_sets`` and ``max_total_bytes``."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 1
    # 50 MiB (an H100's) when torch does not say
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 50 * MIB
    if set_bytes <= 0 or set_bytes > 2 * l2:
        return 1
    return max(1, min(math.ceil(2 * l2 / set_bytes) + 1, max_sets, max_total_bytes // set_bytes))


def cycle(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that calls ``fns[0]``, ``fns[1]``, ... in turn."""
    if len(fns) == 1:
        return fns[0]
    it = itertools.cycle(fns)
    return lambda: next(it)()
