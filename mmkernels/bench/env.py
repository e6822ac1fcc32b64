"""What a benchmark result must carry to mean anything: device, versions, commit and date.

Used by ``mmkernels bench``, the pytest-benchmark suite (``benchmarks/conftest.py``) and
``benchmarks/bench_attention.py``, so every results file names its machine the same way.
Nothing here queries a GPU at import.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["describe", "device_name", "device_slug", "git_commit", "now_iso", "slug", "versions"]

_REPO = Path(__file__).resolve().parents[2]


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-") or "unknown"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Any = None) -> str:
    """The CUDA device's name, or ``cpu: <model>`` (the CPU model from /proc/cpuinfo)."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_model()}"


def device_slug(device: Any = None) -> str:
    """File-name key of the device: baselines are ``benchmarks/baselines/<device_slug>.json``.

    CPU timings depend on the thread count torch uses, so it is part of a CPU's key."""
    import torch

    name = device_name(device)
    if name.startswith("cpu: "):
        return slug(f"cpu {name[5:]} {torch.get_num_threads()}t")
    return slug(name)


def git_commit() -> tuple[str, bool | None]:
    """(sha, dirty) of the checkout; the device machine's copy has no ``.git``, so there the
    caller passes the commit in ``MMKERNELS_COMMIT`` (dirty is then None: unknown)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                                capture_output=True, text=True, timeout=10)
            return sha.stdout.strip(), (bool(st.stdout.strip()) if st.returncode == 0 else None)
    except Exception:
        pass
    return os.environ.get("MMKERNELS_COMMIT") or "unknown", None


def _module_version(name: str) -> str | None:
    import importlib
    import importlib.metadata

    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:
        return None


def versions() -> dict[str, Any]:
    import torch

    import mmkernels

    v: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _module_version("triton"),
        "mmkernels": mmkernels.__version__,
    }
    try:
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:
        v["cudnn"] = None
    for name in ("flash_attn", "xformers"):
        ver = _module_version(name)
        if ver is not None:
            v[name] = ver
    return v


def _driver(torch) -> str | None:
    from .info import _driver_version

    return _driver_version(torch)


def describe(device: Any = None, *, nvidia_smi: bool = False) -> dict[str, Any]:
    """``{"device": {...}, "versions": {...}, "interpreter": ...}`` for a results file.

    ``nvidia_smi=True`` adds the driver, max SM clock and power limit as nvidia-smi reports
    them (they change timings; torch does not expose the last two)."""
    import torch

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    d: dict[str, Any] = {"type": device.type, "name": device_name(device), "slug": device_slug(device)}
    if device.type == "cuda":
        try:
            p = torch.cuda.get_device_properties(device)
            d.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2**30, 1),
                     l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None)
        except Exception as exc:  # pragma: no cover - broken driver
            d["properties_error"] = str(exc)
        d["driver"] = _driver(torch)
        if nvidia_smi:
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
                if q.returncode == 0 and q.stdout.strip():
                    d["nvidia_smi"] = q.stdout.strip().splitlines()[0]
            except Exception:
                pass
    else:
        d["threads"] = torch.get_num_threads()
    return {"device": d, "versions": versions(), "interpreter": os.environ.get("TRITON_INTERPRET", "")}
