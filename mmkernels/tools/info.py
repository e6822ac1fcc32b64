"""``mmkernels info``: versions, devices, build state and which backend can run each op here.

Every backend of every registered op is shown twice: ``available()`` (holds for every call:
missing package, missing extension) and ``not_supported_reasons`` for a small representative
call on the default device (CUDA when present, else CPU), as :func:`mmkernels.dispatch.explain`
answers it for the op's public function: no kernel is compiled or run. Never runs nvidia-smi;
reads the driver version from torch only when a GPU is present.

The device's ceilings (:func:`mmkernels.bench.env.ceilings`: a large copy in GB/s, a large matmul
in TFLOP/s) are read from the per-device cache, or measured on first use (~2 s on a GPU, ~0.3 s
on a CPU) and cached; on a CPU at the thread count ``mmkernels bench`` runs with (``--threads``),
so ``--remeasure`` refreshes the very entry its "% peak" divides by; ``--no-ceilings`` leaves
them out.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from collections.abc import Callable
from typing import Any

from ..bench.env import driver_version, module_version

__all__ = ["collect", "format_text", "main", "PROBES"]


# --------------------------------------------------------------------------------------
# probe calls: one small call per op, through the op's public function
# --------------------------------------------------------------------------------------
def _probe_attention(torch, device, dtype):
    q, k, v = (torch.randn(1, 2, 16, 64, device=device, dtype=dtype) for _ in range(3))
    return (q, k, v), {}, f"query/key/value (1, 2, 16, 64) {_dt(dtype)}"


def _probe_attention_scores(torch, device, dtype):
    q, k = (torch.randn(1, 2, 16, 64, device=device, dtype=dtype) for _ in range(2))
    return (q, k), {"query_index": 0}, f"query/key (1, 2, 16, 64), row 0 {_dt(dtype)}"


def _probe_attention_varlen(torch, device, dtype):
    q, k, v = (torch.randn(16, 2, 64, device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, 6, 16], dtype=torch.int32, device=device)
    return (q, k, v, cu, cu), {}, f"query/key/value (16, 2, 64), sequences of 6 and 10 {_dt(dtype)}"


def _probe_qformer_cross_attention(torch, device, dtype):
    hq, hk = 64, 48
    kw = dict(device=device, dtype=dtype)
    args = (
        torch.randn(1, 8, hq, **kw), torch.randn(1, 17, hk, **kw),
        torch.randn(hq, hq, **kw), torch.randn(hq, **kw),
        torch.randn(hq, hk, **kw), torch.randn(hq, **kw),
        torch.randn(hq, hk, **kw), torch.randn(hq, **kw),
        2,
    )
    return args, {}, f"hidden (1, 8, 64), encoder (1, 17, 48), 2 heads {_dt(dtype)}"


def _probe_token_pool(torch, device, dtype):
    x = torch.randn(1, 16, 32, device=device, dtype=dtype)
    return (x,), {"mode": "avg", "kernel_size": 2}, f"x (1, 16, 32) avg 2x2 {_dt(dtype)}"


#: op name (as registered in mmkernels.dispatch) -> builder of (args, kwargs, description)
PROBES: dict[str, Callable] = {
    "attention": _probe_attention,
    "attention_scores": _probe_attention_scores,
    "attention_varlen": _probe_attention_varlen,
    "qformer_cross_attention": _probe_qformer_cross_attention,
    "token_pool": _probe_token_pool,
}


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _probe(op: str, device, dtype) -> tuple[dict[str, list[str]] | None, str | None, str]:
    """({backend: why it cannot run the probe call}, the auto-mode choice, description), from
    :func:`mmkernels.dispatch.explain` (nothing runs); (None, None, why not) when no probe ran."""
    import torch

    import mmkernels

    from .. import dispatch

    build = PROBES.get(op)
    if build is None or getattr(mmkernels, op, None) is None:
        return None, None, "no probe call is defined for this op"
    try:
        args, kwargs, desc = build(torch, device, dtype)
        with mmkernels.use_backend(None):
            ex = dispatch.explain(op, *args, **kwargs)
    except Exception as exc:
        return None, None, f"probe call failed: {exc.__class__.__name__}: {exc}"
    return ex.reasons, ex.chosen, f"{desc} on {device}"


# --------------------------------------------------------------------------------------
# collection
# --------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    """nvcc that a csrc/ build would use (same lookup order as torch.utils.cpp_extension)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        return "/usr/local/cuda/bin/nvcc"
    return None


def _device_reasons(torch, device) -> dict[str, str]:
    """Why the device-bound backends cannot run on ``device`` at all — the rule every op's own
    check applies first (``_utils.triton_device_reason``; the CUDA extension needs CUDA tensors).
    Used for an op without a probe call, so no op reads "available" where the others read "no"."""
    from .._utils import triton_device_reason

    out = {}
    why = triton_device_reason(torch.empty(0, device=device))
    if why is not None:
        out["triton"] = str(why)
    if device.type != "cuda":
        out["cuda"] = "CPU tensors: the CUDA extension runs on CUDA tensors only"
    return out


def _reason_texts(reasons) -> list[str]:
    return [getattr(r, "text", str(r)) for r in reasons]


def collect(*, ceilings: bool = False, remeasure: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Everything ``mmkernels info`` reports, as a JSON-serialisable dict.

    ``ceilings``: add the device's measured ceilings (read from the per-device cache, measured on
    first use — ~2 s on a GPU, ~0.3 s on a CPU), on a CPU at ``threads`` torch threads."""
    import torch

    import mmkernels

    from .. import _ext, dispatch
    from .._utils import interpreting, triton_import_error

    info: dict[str, Any] = {
        "mmkernels": mmkernels.__version__,
        "mmkernels_path": os.path.dirname(os.path.abspath(mmkernels.__file__)),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "triton_import_error": triton_import_error(),
        "numpy": module_version("numpy"),
    }

    has_cuda = torch.cuda.is_available()
    devices = []
    if has_cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append({
                "index": i,
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "sm_count": p.multi_processor_count,
            })
    info["cuda"] = {
        "torch_built_with": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "available": has_cuda,
        "driver": driver_version(torch) if has_cuda else None,
        "device_count": len(devices),
        "devices": devices,
        "nvcc": _nvcc(),
    }
    info["triton_interpret"] = {"env": os.environ.get("TRITON_INTERPRET"), "enabled": interpreting()}
    try:
        forced = dispatch.forced_backend()
        forced_err = None
    except ValueError as exc:
        forced, forced_err = None, str(exc)
    info["backend_env"] = {"MMKERNELS_BACKEND": os.environ.get("MMKERNELS_BACKEND"), "forced": forced,
                           "error": forced_err}
    ext_reason = _ext.unavailable_reason()
    if not torch.version.cuda and not _ext.available():  # no build switch helps a CPU-only torch
        ext_reason = "not usable: this torch is a CPU-only build (the extension needs torch with CUDA and nvcc)"
    info["cuda_extension"] = {"available": _ext.available(), "reason": ext_reason}

    device = torch.device("cuda" if has_cuda else "cpu")
    dtype = torch.float16 if has_cuda else torch.float32
    ops: dict[str, Any] = {}
    device_reasons = _device_reasons(torch, device)
    for op in sorted(dispatch._registry):
        probe, auto, probe_desc = _probe(op, device, dtype)
        rows = []
        for b in dispatch.backends(op):
            try:
                unavailable = _reason_texts(b.available())
            except Exception as exc:
                unavailable = [f"available() raised {exc.__class__.__name__}: {exc}"]
            if b.name == "cuda" and unavailable and not torch.version.cuda:
                unavailable = [ext_reason]  # the build switches the extension's own reason names cannot help
            reasons = None if probe is None else probe.get(b.name, [])
            if reasons is None and device_reasons.get(b.name):  # no probe: the device rule still holds
                reasons = [device_reasons[b.name]]
            rows.append({"name": b.name, "description": b.description, "available": not unavailable,
                         "unavailable_reasons": unavailable, "probe_ok": None if reasons is None else not reasons,
                         "probe_reasons": reasons or []})
        ops[op] = {"probe": probe_desc, "probe_ran": probe is not None, "auto": auto, "backends": rows}
    info["ops"] = ops
    if ceilings:
        from ..bench import env

        if device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        info["ceilings"] = env.ceilings(device, remeasure=remeasure)
    return info


# --------------------------------------------------------------------------------------
# text output
# --------------------------------------------------------------------------------------
def format_text(info: dict[str, Any]) -> str:
    out: list[str] = []

    def kv(key: str, value: Any, indent: int = 2) -> None:
        out.append(f"{' ' * indent}{key:<22} {value}")

    out.append(f"mmkernels {info['mmkernels']}  ({info['mmkernels_path']})")
    kv("python", f"{info['python']}  ({info['python_executable']})")
    kv("platform", info["platform"])
    kv("torch", info["torch"])
    triton = info["triton"] or "not installed"
    if info["triton_import_error"] and info["triton"]:
        triton += f"  (import fails: {info['triton_import_error']})"
    kv("triton", triton)
    kv("numpy", info["numpy"] or "not installed")

    c = info["cuda"]
    out.append("cuda")
    if c["torch_built_with"]:
        kv("CUDA runtime", f"{c['torch_built_with']} (torch build)")
    elif c["hip"]:
        kv("HIP runtime", f"{c['hip']} (torch build)")
    else:
        kv("CUDA runtime", "none: CPU-only torch build")
    if c["available"]:
        kv("driver", c["driver"] or "unknown (not exposed by this torch)")
        kv("devices", c["device_count"])
        for d in c["devices"]:
            kv(f"  cuda:{d['index']}",
               f"{d['name']}, sm_{d['capability'].replace('.', '')}, {d['memory_gib']} GiB, {d['sm_count']} SMs")
    else:
        kv("devices", "no CUDA device")
    kv("nvcc", c["nvcc"] or "not found")

    ti = info["triton_interpret"]
    if ti["enabled"]:
        state = f"on (TRITON_INTERPRET={ti['env']}): Triton kernels run on CPU tensors in the interpreter"
    elif ti["env"] is None:
        state = "unset: Triton kernels run on CUDA tensors only"
    else:
        state = f"off (TRITON_INTERPRET={ti['env']}): Triton kernels run on CUDA tensors only"
    kv("TRITON_INTERPRET", state, 0)
    be = info["backend_env"]
    if be["error"]:
        kv("MMKERNELS_BACKEND", f"invalid: {be['error']}", 0)
    else:
        kv("MMKERNELS_BACKEND", f"{be['MMKERNELS_BACKEND']} (forces {be['forced']})" if be["forced"]
           else "unset: auto", 0)
    ext = info["cuda_extension"]
    kv("CUDA extension", "built and usable" if ext["available"] else ext["reason"], 0)

    out.append("backends (available: always usable here; probe: the representative call below)")
    for op, o in info["ops"].items():
        out.append(f"  {op}  [probe: {o['probe']}]")
        width = max((len(b["name"]) for b in o["backends"]), default=0)
        for b in o["backends"]:
            if not b["available"]:
                status, why = "unavailable", "; ".join(b["unavailable_reasons"])
            elif b["probe_ok"] is None:
                status, why = "available", b["description"]
            elif b["probe_ok"]:
                status, why = "yes", b["description"]
            else:
                status, why = "no", "; ".join(b["probe_reasons"])
            out.append(f"    {b['name']:<{width}}  {status:<11}  {why}")
        if o["probe_ran"]:
            out.append(f"    -> auto mode picks: {o['auto'] or 'none (the call would raise)'}")
    if not info["ops"]:
        out.append("  (no ops registered)")
    c = info.get("ceilings")
    if c is not None:
        out.append("ceilings (measured on this device; % of peak in `mmkernels bench` is against these)")
        if c.get("error"):
            kv("error", c["error"])
        else:
            kv("copy", f"{c['copy_gbps']:.1f} GB/s  (dst.copy_(src), {c['copy_bytes'] / 2**20:.0f} MiB, read + write)")
            n = c.get("matmul_shape") or ["?"] * 3
            kv("matmul", f"{c['matmul_tflops']:.4g} TFLOP/s  ({c['matmul_dtype']} {n[0]}x{n[1]}x{n[2]})"
               + (f", {c['threads']} thread(s) as `mmkernels bench` runs" if c.get("threads") else ""))
            kv("measured", f"{c.get('measured')}, torch {c.get('torch')}"
               + ("  (cached" if c.get("cached") else "  (measured now, cached")
               + f" in {c.get('cache_file')}; --remeasure to refresh)")
    return "\n".join(out)


def main(*, as_json: bool = False, ceilings: bool = True, remeasure: bool = False, threads: int | None = None) -> int:
    """Print the report; ``as_json`` prints JSON instead."""
    info = collect(ceilings=ceilings, remeasure=remeasure, threads=threads)
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_text(info))
    return 0
