"""The device's measured ceilings: what "% of peak" in a benchmark report is a percentage of.

Two numbers, measured once per device and cached (``<cache dir>/ceilings.json``, keyed by
:func:`mmkernels.bench.env.device_slug`):

- ``copy_gbps``: a large device-to-device copy (``dst.copy_(src)``), bytes read + bytes written
  per second. CUDA: 1 GiB; CPU: 64 MiB. The ceiling for memory-bound ops (token pooling).
- ``matmul_tflops``: a large matrix product. CUDA: bf16 8192³; CPU: float32 1024³ (the dtype the
  CPU benchmarks run in; a CPU number is a smoke test, seconds to measure). The ceiling for
  attention and the Q-Former.

Measured, not looked up from a data sheet: a clock-capped or power-limited GPU shows its real
ceiling. The cache directory is ``$MMKERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mmkernels``,
else ``~/.cache/mmkernels``; ``mmkernels info --remeasure`` measures again.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import env, timing
from .flops import matmul_flops

__all__ = ["cache_dir", "cache_file", "get", "measure", "percent_of"]

GIB = 1 << 30
MIB = 1 << 20
FIELDS = ("copy_gbps", "matmul_tflops", "matmul_dtype")


def cache_dir() -> Path:
    if os.environ.get("MMKERNELS_CACHE_DIR"):
        return Path(os.environ["MMKERNELS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmkernels"


def cache_file() -> Path:
    return cache_dir() / "ceilings.json"


def measure(device: Any = None) -> dict[str, Any]:
    """Measure both ceilings on ``device`` now (CUDA: ~2 s; CPU: ~0.3 s)."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    copy_bytes = 1 * GIB if cuda else 64 * MIB
    n = 8192 if cuda else 1024
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    warm, rep = (25.0, 100.0) if cuda else (10.0, 60.0)
    g = torch.Generator(device=device).manual_seed(0)

    def time_copy():
        src = torch.randn(copy_bytes // 4, generator=g, device=device, dtype=torch.float32)  # random, never zeros
        dst = torch.empty_like(src)
        return timing.time_fn(lambda: dst.copy_(src), device, warmup_ms=warm, rep_ms=rep, min_reps=5)

    def time_matmul():
        a = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(mm_dtype)
        b = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(mm_dtype)
        return timing.time_fn(lambda: torch.matmul(a, b), device, warmup_ms=warm, rep_ms=rep, min_reps=5)

    t_copy = time_copy()
    t_mm = time_matmul()
    if cuda:
        torch.cuda.empty_cache()

    # a ceiling is what the device can do, so the fast end of the distribution (the 20 %
    # quantile), not the median: on a shared CPU the median includes other processes' load
    return {
        "device": env.device_name(device),
        "copy_gbps": round(2 * copy_bytes / (t_copy.ms_p20 * 1e-3) / 1e9, 2),
        "copy_bytes": copy_bytes,
        "matmul_tflops": round(matmul_flops(n, n, n) / (t_mm.ms_p20 * 1e-3) / 1e12, 4),
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "matmul_shape": [n, n, n],
        "timer": f"{t_copy.timer}, 20 % quantile",
        "measured": env.now_iso(),
        "torch": torch.__version__,
    }


def _load() -> dict[str, Any]:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(data: dict[str, Any]) -> str | None:
    """Write the cache atomically; the error text when the directory is not writable."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ceilings.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def get(device: Any = None, *, remeasure: bool = False) -> dict[str, Any]:
    """The cached ceilings of ``device`` (measured and cached on first use), plus ``key``,
    ``cached`` (True: read from the cache) and ``cache_file``. Never raises: a failed
    measurement comes back as ``{"error": ...}`` with the ceiling fields set to None."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    key = env.device_slug(device)
    data = _load()
    entry = None if remeasure else data.get(key)
    cached = entry is not None and all(f in entry for f in FIELDS)
    if not cached:
        try:
            entry = measure(device)
        except Exception as exc:
            return {"key": key, "cached": False, "cache_file": str(cache_file()),
                    "error": f"measurement failed: {type(exc).__name__}: {exc}",
                    **{f: None for f in FIELDS}}
        data[key] = entry
        err = _save(data)
        if err:
            entry = {**entry, "cache_error": err}
    return {**entry, "key": key, "cached": cached, "cache_file": str(cache_file())}


def percent_of(value: float | None, ceiling: float | None) -> float | None:
    if value is None or not ceiling:
        return None
    return 100.0 * value / ceiling
