"""Timing done right, on CUDA and on the CPU.

- CUDA: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed by
  zeroing a 256 MiB buffer before each call, gradients reset to None), median and 20/80 %
  quantiles; CUDA events with the same flush when that ``do_bench`` lacks ``quantiles``.
- CPU: a ``perf_counter`` loop after a timed warm-up, same statistics.
- Rotating input sets: :func:`rotation_count` says how many copies of a case's inputs make more
  than twice the L2 cache, and :func:`cycle` turns one closure per copy into one callable that
  uses the next copy on every call, so even without the flush no call reads its operands from
  a cache the previous call warmed.  (One set on the CPU: there the numbers are a smoke test.)

Inputs are the caller's business, but the rule is: random (``randn``), never zeros — zeros make
multipliers and memory compressors look faster than they are.
"""

from __future__ import annotations

import inspect
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

__all__ = ["Timing", "cycle", "l2_bytes", "quantiles", "rotation_count", "sync", "time_fn"]

MIB = 1 << 20
_FLUSH_BYTES = 256 * MIB  # what triton's do_bench zeroes: larger than any current L2 (H100: 50 MiB)


@dataclass(frozen=True)
class Timing:
    """One call's time in milliseconds: median and 20/80 % quantiles; ``reps`` timed calls."""

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
    if not xs:
        raise ValueError("quantiles of an empty sample")
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
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
    (backward timings would otherwise include gradient accumulation)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            params = inspect.signature(do_bench).parameters
        except Exception:
            do_bench, params = None, {}
        if do_bench is not None and "quantiles" in params:
            kw = dict(warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            if "grad_to_none" in params:
                kw["grad_to_none"] = list(grads) or None
            if "return_mode" in params:
                kw["return_mode"] = "median"
            p50, p20, p80 = (float(x) for x in do_bench(fn, **kw))
            return Timing(p50, p20, p80, "triton.testing.do_bench")
        return _time_events(fn, grads, device, warmup_ms, rep_ms, min_reps, max_reps)
    return _time_host(fn, grads, warmup_ms, rep_ms, min_reps, max_reps)


def _time_events(fn, grads, device, warmup_ms, rep_ms, min_reps, max_reps) -> Timing:
    import torch

    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        reset_grads(grads)
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 5, 1e-3)  # includes the flush: a safe over-estimate
    n_warm = max(1, int(warmup_ms / est))
    n_rep = min(max_reps, max(min_reps, int(rep_ms / est)))
    for _ in range(n_warm):
        reset_grads(grads)
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_rep)]
    for s, e in ev:
        flush.zero_()
        reset_grads(grads)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    p50, p20, p80 = quantiles([s.elapsed_time(e) for s, e in ev], [0.5, 0.2, 0.8])
    return Timing(p50, p20, p80, "cuda-events", n_rep)


def _time_host(fn, grads, warmup_ms, rep_ms, min_reps, max_reps) -> Timing:
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
    p50, p20, p80 = quantiles(times, [0.5, 0.2, 0.8])
    return Timing(p50, p20, p80, "perf_counter", len(times))


# --------------------------------------------------------------------------------------
# rotating input sets
# --------------------------------------------------------------------------------------
def l2_bytes(device) -> int:
    """The device's L2 size (0 on the CPU; 50 MiB when torch does not say, an H100's)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return 0
    try:
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 50 * MIB
    except Exception:
        return 50 * MIB


def rotation_count(set_bytes: int, device, *, max_sets: int = 32, max_total_bytes: int = 2 << 30) -> int:
    """How many copies of a ``set_bytes`` input set add up to more than twice the L2 cache.

    1 on the CPU and whenever one set alone is already larger; capped by ``max_sets`` and by
    ``max_total_bytes`` of device memory."""
    l2 = l2_bytes(device)
    if l2 == 0 or set_bytes <= 0 or set_bytes > 2 * l2:
        return 1
    n = math.ceil(2 * l2 / set_bytes) + 1
    return max(1, min(n, max_sets, max_total_bytes // set_bytes))


def cycle(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """One callable that calls ``fns[0]``, ``fns[1]``, ... in turn (``fns[0]`` when alone)."""
    if len(fns) == 1:
        return fns[0]
    it = itertools.cycle(fns)
    return lambda: next(it)()
