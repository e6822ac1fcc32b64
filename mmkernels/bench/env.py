"""What a benchmark result must carry to mean anything: device, versions, commit, date, and the
device's measured ceilings (what "% of peak" is a percentage of).

Ceilings: a large copy (``dst.copy_(src)``, bytes read + written per second: CUDA 1 GiB, CPU
64 MiB) for memory-bound ops, a large matmul (CUDA bf16 8192³, CPU float32 1024³) for
compute-bound ones. Measured, not read from a data sheet, so a clock-capped GPU shows its real
ceiling; cached in ``<cache dir>/ceilings.json`` keyed by :func:`device_slug` — on a CPU that
key holds torch's thread count, so ``mmkernels bench`` (1 thread) is compared with a ceiling
measured at 1 thread. The cache directory is ``$MMKERNELS_CACHE_DIR``, else
``$XDG_CACHE_HOME/mmkernels``, else ``~/.cache/mmkernels``. Nothing here queries a GPU at import.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from . import timing

__all__ = ["ceilings", "describe", "device_name", "device_slug", "git_commit", "now_iso", "versions"]

_REPO = Path(__file__).resolve().parents[2]
GIB, MIB = 1 << 30, 1 << 20
CEILING_FIELDS = ("copy_gbps", "matmul_tflops", "matmul_dtype")


def _device(device):
    import torch

    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def device_name(device: Any = None) -> str:
    """The CUDA device's name, or ``cpu: <model>`` (from /proc/cpuinfo)."""
    import torch

    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        model = None
    return f"cpu: {model or platform.processor() or platform.machine()}"


def device_slug(device: Any = None) -> str:
    """File-name key of the device (``nvidia-h100-80gb-hbm3``): baselines are
    ``benchmarks/baselines/<slug>.json``. A CPU's holds torch's current thread count."""
    import torch

    name = device_name(device)
    if name.startswith("cpu: "):
        name = f"cpu {name[5:]} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_commit() -> tuple[str, bool | None]:
    """(sha, dirty) of the checkout; a copy without ``.git`` (the device machine's) passes the
    commit in ``MMKERNELS_COMMIT`` (dirty is then None: unknown)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                                capture_output=True, text=True, timeout=10)
            return sha.stdout.strip(), (bool(st.stdout.strip()) if st.returncode == 0 else None)
    except Exception:
        pass
    return os.environ.get("MMKERNELS_COMMIT") or "unknown", None


def module_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:
        return None


def driver_version(torch) -> str | None:
    """The CUDA driver version as torch reports it (never runs nvidia-smi)."""
    for owner, name in ((torch.cuda, "driver_version"), (torch._C, "_cuda_getDriverVersion")):
        fn = getattr(owner, name, None)
        if callable(fn):
            try:
                v = fn()
            except Exception:
                continue
            return f"{v // 1000}.{(v % 1000) // 10}" if isinstance(v, int) else str(v)
    return None


def versions() -> dict[str, Any]:
    import torch

    import mmkernels

    v: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                         "triton": module_version("triton"), "mmkernels": mmkernels.__version__}
    try:
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        v["cudnn"] = None
    v.update({n: module_version(n) for n in ("flash_attn", "xformers") if module_version(n)})
    return v


def describe(device: Any = None, *, nvidia_smi: bool = False) -> dict[str, Any]:
    """``{"device": {...}, "versions": {...}, "interpreter": ...}`` for a results file;
    ``nvidia_smi`` adds the driver, max SM clock and power limit (they change timings)."""
    import torch

    device = _device(device)
    d: dict[str, Any] = {"type": device.type, "name": device_name(device), "slug": device_slug(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        d.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                 memory_gib=round(p.total_memory / GIB, 1), driver=driver_version(torch),
                 l2_mib=round(getattr(p, "L2_cache_size", 0) / MIB, 1) or None)
        if nvidia_smi:
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
                d["nvidia_smi"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
            except Exception:
                pass
    else:
        d["threads"] = torch.get_num_threads()
    return {"device": d, "versions": versions(), "interpreter": os.environ.get("TRITON_INTERPRET", "")}


# --------------------------------------------------------------------------------------
# ceilings
# --------------------------------------------------------------------------------------
def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("MMKERNELS_CACHE_DIR") or Path(base) / "mmkernels") / "ceilings.json"


def measure_ceilings(device: Any = None) -> dict[str, Any]:
    """Measure both ceilings on ``device`` now (CUDA: ~2 s; CPU: ~0.3 s)."""
    import torch

    device = _device(device)
    cuda = device.type == "cuda"
    nbytes, n = (GIB, 8192) if cuda else (64 * MIB, 1024)
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    kw = dict(warmup_ms=25.0, rep_ms=100.0) if cuda else dict(warmup_ms=10.0, rep_ms=60.0)
    g = torch.Generator(device=device).manual_seed(0)
    src = torch.randn(nbytes // 4, generator=g, device=device)
    dst = torch.empty_like(src)
    t_copy = timing.time_fn(lambda: dst.copy_(src), device, **kw)
    src = dst = None  # the copy's memory is free again for the matmul
    a, b = (torch.randn(n, n, generator=g, device=device).to(mm_dtype) for _ in range(2))
    t_mm = timing.time_fn(lambda: torch.matmul(a, b), device, **kw)
    # a ceiling is what the device can do: the fast end (20 % quantile), not the median, which on
    # a shared CPU includes other processes' load
    return {"device": device_name(device), "threads": None if cuda else torch.get_num_threads(),
            "copy_gbps": round(2 * nbytes / (t_copy.ms_p20 * 1e-3) / 1e9, 2), "copy_bytes": nbytes,
            "matmul_tflops": round(2.0 * n**3 / (t_mm.ms_p20 * 1e-3) / 1e12, 4),
            "matmul_dtype": str(mm_dtype).replace("torch.", ""), "matmul_shape": [n, n, n],
            "timer": f"{t_copy.timer}, 20 % quantile", "measured": now_iso(), "torch": torch.__version__}


def ceilings(device: Any = None, *, remeasure: bool = False) -> dict[str, Any]:
    """The cached ceilings of ``device`` at torch's current thread count (measured and cached on
    first use, or with ``remeasure``), plus ``key``, ``cached`` and ``cache_file``. Never
    raises: a failed measurement comes back as ``{"error": ...}`` with the fields None."""
    device = _device(device)
    key, path = device_slug(device), cache_file()
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    entry = None if remeasure else data.get(key)
    cached = isinstance(entry, dict) and all(f in entry for f in CEILING_FIELDS)
    if not cached:
        try:
            entry = data[key] = measure_ceilings(device)
        except Exception as exc:
            return {"key": key, "cached": False, "cache_file": str(path), **dict.fromkeys(CEILING_FIELDS),
                    "error": f"measurement failed: {type(exc).__name__}: {exc}"}
        try:  # atomically: two processes measuring at once leave one whole file
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ceilings.", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            entry = {**entry, "cache_error": f"{type(exc).__name__}: {exc}"}
    return {**entry, "key": key, "cached": cached, "cache_file": str(path)}


def percent_of(value: float | None, ceiling: float | None) -> float | None:
    return None if value is None or not ceiling else 100.0 * value / ceiling
