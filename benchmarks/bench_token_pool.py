#!/usr/bin/env python
"""Token-pool benchmark (issue 4): the VLM visual-token reducers, eager chains vs mmkernels.

Shapes (bf16 on CUDA), each model's reducer as it runs today:

=================  =================================  =========================================
model              x (B, N, C)                        op
=================  =================================  =========================================
llava-ov           (64, 729, 1152)  B = batch·frames  bilinear 27×27 → 14×14 (``apply_pooling``)
gemma3             (8, 4096, 1152)                    AvgPool2d(4): 64×64 → 16×16, RMSNorm (1 + w)
internvl           (16, 1024, 1024)                   pixel shuffle 2×2 (32×32 → 16×16 of 4C), LayerNorm(4C)
llava-next-video   (64, 576, 1024)                    AvgPool2d(2): 24×24 → 12×12
=================  =================================  =========================================

Backends: ``eager`` (the model's chain: view/permute/contiguous, ``F.interpolate`` /
``F.avg_pool2d`` / the pixel-shuffle view-permute-reshape, the norm as the model writes it),
``compile`` (``torch.compile`` of that chain, static shapes), ``triton`` and ``cuda``
(``mmkernels.token_pool`` forced to that backend), and on CPU ``reference``
(``mmkernels.reference.token_pool``).  Forward (``fwd``) and forward + backward (``fwd+bwd``:
``f(x).backward(dout)``, gradients of x and of the norm's weight/bias).

Throughput: bytes = x read once + output written once (fwd); fwd+bwd adds grad_out read once and
dx written once (norm parameters counted too; saved tensors and workspaces are not: they are
the implementation's cost).  GB/s = bytes / median time, and % of the copy bandwidth measured in
the same run (``dst.copy_(src)`` of ``--copy-mib`` MiB, counting read + write).  The issue's
target on an H100: >= 85 % of copy bandwidth and >= 3x eager.

Every backend is wrapped: a missing extension, an unsupported case, an out-of-memory or a
compile error is recorded as ``skipped`` with the reason and the run goes on; the JSON is
rewritten after every case.  A CUDA error that poisons the context ends the run (exit 3) naming
the backend in ``fatal_backends``; ``--resume`` then skips it and finishes the rest.  Outputs
are checked against the float64 reference on two batch elements (``check``; ``!`` in the summary).

Usage::

    python benchmarks/bench_token_pool.py --json OUT.json                  # CUDA, every case
    python benchmarks/bench_token_pool.py --json OUT.json --quick          # fewer timing reps
    python benchmarks/bench_token_pool.py --json OUT.json --device cpu --quick   # seconds, CPU
    python benchmarks/bench_token_pool.py --json OUT.json --summary-only   # reprint the tables

Selection also comes from the environment (``MMK_POOL_MODELS``, ``MMK_POOL_BACKENDS``,
``MMK_POOL_EXCLUDE``, ``MMK_POOL_MODES``, ``MMK_POOL_BUDGET_S``), so ``scripts/gpu_check.sh``
can fit it into one lease.  The commit is ``git rev-parse HEAD`` or ``$MMKERNELS_COMMIT``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # benchmark the checkout, installed or not
    sys.path.insert(0, str(_REPO))

SCHEMA = 1
MODES = ("fwd", "fwd+bwd")
ALL_BACKENDS = ("eager", "triton", "cuda", "compile", "reference")
# tier 0 runs over every case before tier 1: when the budget runs out, the comparison that
# matters (eager vs the fused kernels) is complete and the slow-to-compile backend is what is cut
TIER = {"eager": 0, "triton": 0, "cuda": 0, "reference": 0, "compile": 1}
EXIT_FATAL = 3
MIB = 1 << 20
BYTE_CONVENTION = ("fwd: x read once + output written once (+ norm weight/bias read once); "
                   "fwd+bwd: fwd + grad_out read once + dx written once (+ dweight/dbias written once); "
                   "saved tensors and workspaces not counted")
# relative (Frobenius) error of the output vs float64 for check.ok: ~5x what bf16 rounding gives
OUT_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


# --------------------------------------------------------------------------------------
# the models' chains
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    name: str
    B: int
    h: int
    w: int
    C: int
    what: str

    @property
    def N(self) -> int:
        return self.h * self.w


MODELS = {
    "llava-ov": Model("llava-ov", 64, 27, 27, 1152, "bilinear 27x27 -> 14x14"),
    "gemma3": Model("gemma3", 8, 64, 64, 1152, "avg 4x4 (64x64 -> 16x16) + RMSNorm(1 + w)"),
    "internvl": Model("internvl", 16, 32, 32, 1024, "pixel shuffle 2x2 -> 16x16 of 4C + LayerNorm(4C)"),
    "llava-next-video": Model("llava-next-video", 64, 24, 24, 1024, "avg 2x2 (24x24 -> 12x12)"),
}
# CPU --quick: the same chains on small tensors (seconds in eager)
QUICK_CPU = {
    "llava-ov": Model("llava-ov", 2, 27, 27, 64, "bilinear 27x27 -> 14x14"),
    "gemma3": Model("gemma3", 2, 16, 16, 64, "avg 4x4 + RMSNorm(1 + w)"),
    "internvl": Model("internvl", 2, 16, 16, 32, "pixel shuffle 2x2 + LayerNorm(4C)"),
    "llava-next-video": Model("llava-next-video", 2, 24, 24, 32, "avg 2x2"),
}


def norm_params(m: Model, device, dtype):
    """The model's norm parameters (None when the reducer has no norm)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    if m.name == "gemma3":  # Gemma3RMSNorm keeps w in the model dtype and multiplies by (1 + w) in fp32
        return {"weight": (0.1 * torch.randn(m.C, generator=g)).to(device, dtype)}
    if m.name == "internvl":  # nn.LayerNorm(4C) in the model dtype
        return {"weight": (1 + 0.1 * torch.randn(4 * m.C, generator=g)).to(device, dtype),
                "bias": (0.1 * torch.randn(4 * m.C, generator=g)).to(device, dtype)}
    return {}


def eager_chain(m: Model):
    """f(x, **params) written as the model's HF code writes it."""
    h, w = m.h, m.w
    if m.name == "llava-ov":  # LlavaOnevisionModel.apply_pooling
        def f(x):
            b, _, dim = x.shape
            t = x.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            t = F.interpolate(t, size=[math.ceil(h / 2), math.ceil(w / 2)], mode="bilinear")
            return t.permute(0, 2, 3, 1).view(b, -1, dim)
    elif m.name == "gemma3":  # Gemma3MultiModalProjector: pool, then mm_soft_emb_norm
        def f(x, weight):
            b, _, c = x.shape
            t = x.transpose(1, 2).reshape(b, c, h, w).contiguous()
            t = F.avg_pool2d(t, kernel_size=4, stride=4).flatten(2).transpose(1, 2)
            tf = t.float()
            out = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + 1e-6)
            return (out * (1.0 + weight.float())).type_as(t)
    elif m.name == "internvl":  # InternVLChatModel.pixel_shuffle(0.5) + mlp1[0] = LayerNorm(4C)
        def f(x, weight, bias):
            n = x.shape[0]
            t = x.reshape(n, h, w, -1)
            n, ww, hh, c = t.size()
            t = t.view(n, ww, hh // 2, c * 2).permute(0, 2, 1, 3).contiguous()
            t = t.view(n, hh // 2, ww // 2, c * 4).permute(0, 2, 1, 3).contiguous()
            t = t.reshape(n, -1, t.shape[-1])
            return F.layer_norm(t, (t.shape[-1],), weight, bias, 1e-5)
    elif m.name == "llava-next-video":  # LlavaNextVideoPooler (AvgPool2d(2, 2))
        def f(x):
            b, _, dim = x.shape
            t = x.view(b, h, w, dim).permute(0, 3, 1, 2)
            t = F.avg_pool2d(t, kernel_size=2, stride=2)
            return t.flatten(2).transpose(1, 2).contiguous()
    else:
        raise ValueError(m.name)
    return f


def mk_kwargs(m: Model) -> dict:
    """The same reducer as mmkernels.token_pool arguments (norm parameters added per call)."""
    return {
        "llava-ov": dict(mode="bilinear"),
        "gemma3": dict(mode="avg", kernel_size=4, norm="rmsnorm", eps=1e-6),
        "internvl": dict(mode="merge", kernel_size=2, norm="layernorm", eps=1e-5),
        "llava-next-video": dict(mode="avg", kernel_size=2),
    }[m.name]


def mk_params(m: Model, params: dict) -> dict:
    if m.name == "gemma3":  # (1 + w) in fp32, as Gemma3RMSNorm computes it
        return {"norm_weight": 1.0 + params["weight"].float()}
    return {f"norm_{k}": v for k, v in params.items()}


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def backend_unavailable(name: str, device) -> str | None:
    """Why a backend cannot run at all here (None: it can)."""
    if name in ("triton", "cuda", "reference"):
        try:
            import mmkernels  # noqa: F401
            from mmkernels.ops import token_pool  # noqa: F401
        except Exception as exc:
            return f"cannot import mmkernels.token_pool: {type(exc).__name__}: {exc}"
    if name == "triton" and device.type == "cpu" and not _interpreting():
        return "CPU tensors run Triton kernels only with TRITON_INTERPRET=1"
    if name == "cuda":
        if device.type != "cuda":
            return "the CUDA extension runs on CUDA tensors only"
        try:
            from mmkernels.kernels import token_pool_cuda
            reasons = token_pool_cuda.available()
        except Exception as exc:
            return f"mmkernels.kernels.token_pool_cuda: {type(exc).__name__}: {exc}"
        if reasons:
            return "; ".join(reasons)
    if name == "compile" and not hasattr(torch, "compile"):
        return "torch.compile is missing"
    return None


def make_fn(name: str, m: Model):
    """f(x, params) -> out for one backend."""
    if name in ("eager", "compile"):
        chain = eager_chain(m)
        if name == "compile":
            import torch._dynamo.config as dcfg
            for attr in ("recompile_limit", "cache_size_limit"):
                if hasattr(dcfg, attr):
                    setattr(dcfg, attr, max(getattr(dcfg, attr), 256))
            chain = torch.compile(chain, dynamic=False)
        return lambda x, params: chain(x, **params)
    kw = mk_kwargs(m)
    if name == "reference":
        from mmkernels.reference.token_pool import token_pool as ref

        return lambda x, params: ref(x, grid=(m.h, m.w), **kw, **mk_params(m, params))
    import mmkernels as mk

    return lambda x, params: mk.token_pool(x, grid=(m.h, m.w), backend=name, **kw, **mk_params(m, params))


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, grads, device, warmup_ms, rep_ms):
    """(p50, p20, p80) ms of one call, and the timer used."""
    if device.type == "cuda":
        try:
            import inspect

            from triton.testing import do_bench

            params = inspect.signature(do_bench).parameters
            if "quantiles" in params:
                kw = dict(warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
                if "grad_to_none" in params and grads:
                    kw["grad_to_none"] = grads
                if "return_mode" in params:
                    kw["return_mode"] = "median"
                return tuple(float(v) for v in do_bench(fn, **kw)), "triton.testing.do_bench"
        except ImportError:
            pass
        return _time_events(fn, grads, device, warmup_ms, rep_ms), "cuda-events"
    return _time_host(fn, grads, warmup_ms, rep_ms), "perf_counter"


def _quantiles(xs, qs):
    xs = sorted(xs)
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo, hi = int(math.floor(pos)), int(math.ceil(pos))
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return tuple(out)


def _reset(grads):
    for t in grads or ():
        t.grad = None


def _time_events(fn, grads, device, warmup_ms, rep_ms):
    flush = torch.empty(256 * MIB, dtype=torch.int8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        _reset(grads)
        fn()
    end.record()
    torch.cuda.synchronize(device)
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        _reset(grads)
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(max(5, int(rep_ms / est)))]
    for s, e in ev:
        flush.zero_()  # cold L2, as do_bench
        _reset(grads)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return _quantiles([s.elapsed_time(e) for s, e in ev], (0.5, 0.2, 0.8))


def _time_host(fn, grads, warmup_ms, rep_ms, min_reps=5):
    t0 = time.perf_counter()
    _reset(grads)
    fn()
    est = max((time.perf_counter() - t0) * 1e3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        _reset(grads)
        fn()
    times = []
    for _ in range(max(min_reps, int(rep_ms / est))):
        _reset(grads)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return _quantiles(times, (0.5, 0.2, 0.8))


def copy_bandwidth(device, mib, warmup_ms, rep_ms) -> dict:
    """A large device-to-device copy: bytes read + written / median time."""
    n = mib * MIB
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    (p50, _, _), timer = time_fn(lambda: dst.copy_(src), None, device, warmup_ms, rep_ms)
    return dict(bytes=2 * n, ms=p50, gbps=2 * n / (p50 * 1e-3) / 1e9, timer=timer,
                what=f"dst.copy_(src), {mib} MiB uint8, counting read + write")


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------
def _git_commit() -> tuple[str, bool | None]:
    env = os.environ.get("MMKERNELS_COMMIT")
    if env:
        return env, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_REPO,
                                capture_output=True, text=True, timeout=10)
            return sha.stdout.strip(), bool(st.stdout.strip()) if st.returncode == 0 else None
    except Exception:
        pass
    return "unknown", None


def _version(name: str):
    try:
        return getattr(__import__(name), "__version__", "unknown")
    except Exception:
        return None


def describe_env(device) -> dict:
    d: dict = {"type": device.type}
    if device.type == "cuda":
        try:
            p = torch.cuda.get_device_properties(device)
            d.update(name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2**30, 1))
        except Exception as exc:
            d["name"] = f"cuda (properties unavailable: {exc})"
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            if q.returncode == 0 and q.stdout.strip():
                d["nvidia_smi"] = q.stdout.strip().splitlines()[0]
        except Exception:
            pass
    else:
        d["name"] = platform.processor() or platform.machine() or "cpu"
        d["threads"] = torch.get_num_threads()
    versions = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                    triton=_version("triton"), mmkernels=_version("mmkernels"))
    return {"device": d, "versions": versions, "interpreter": os.environ.get("TRITON_INTERPRET", "")}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------
def _tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _cuda_alive(device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:
        return False


def run_case(rec: dict, m: Model, fn, device, dtype, args, ref_out) -> None:
    """Fills rec (status, timings, throughput, check)."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(m.B, m.N, m.C, generator=g).to(device, dtype)
    params = norm_params(m, device, dtype)
    bwd = rec["mode"] == "fwd+bwd"
    leaves = [x] + list(params.values())
    if bwd:
        for t in leaves:
            t.requires_grad_(True)
    t0 = time.perf_counter()
    # the first call under the grad mode of the timed ones (torch.compile guards on it)
    with warnings.catch_warnings(), (contextlib.nullcontext() if bwd else torch.no_grad()):
        warnings.simplefilter("ignore")
        out = fn(x, params)
        if bwd:
            dout = torch.randn(out.shape, generator=g).to(device, dtype)
            out.backward(dout)
    _sync(device)
    rec["first_call_s"] = round(time.perf_counter() - t0, 3)

    # correctness on the first two batch elements (float64 reference of the same reducer)
    n = ref_out.shape[0]
    err = (out[:n].detach().double() - ref_out)
    den = ref_out.norm().item()
    rel = err.norm().item() / den if den > 0 else err.norm().item()
    finite = bool(torch.isfinite(out).all())
    rec["check"] = dict(max_abs=err.abs().max().item(), rel=rel, finite=finite,
                        ok=finite and rel <= OUT_RTOL.get(dtype, 2e-2))

    nbytes = _tensor_bytes(x, out, *params.values())
    if bwd:
        nbytes += _tensor_bytes(out, x, *params.values())  # grad_out read, dx (and dparams) written
        grads = leaves

        def call():
            fn(x, params).backward(dout)
    else:
        grads = None

        def call():
            fn(x, params)
    del out
    with torch.no_grad() if not bwd else contextlib.nullcontext():
        (p50, p20, p80), timer = time_fn(call, grads, device, args.warmup_ms, args.rep_ms)
    rec.update(status="ok", ms_p50=p50, ms_p20=p20, ms_p80=p80, timer=timer, bytes=nbytes,
               gbps=nbytes / (p50 * 1e-3) / 1e9)


def reference_out(m: Model, device, dtype, seed) -> torch.Tensor:
    """float64 output of the reducer for batch elements 0..1 (the same x as run_case draws)."""
    from mmkernels.reference.token_pool import token_pool as ref

    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m.B, m.N, m.C, generator=g).to(device, dtype)[:2].double()
    params = {k: v.double() for k, v in norm_params(m, device, dtype).items()}
    kw = mk_kwargs(m)
    if m.name == "gemma3":
        return ref(x, grid=(m.h, m.w), **kw, norm_weight=1.0 + params["weight"])
    return ref(x, grid=(m.h, m.w), **kw, **{f"norm_{k}": v for k, v in params.items()})


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def finish(doc: dict) -> None:
    """speedups, % of copy bandwidth, and the faster fused backend per (model, mode)."""
    copy = (doc.get("copy_bandwidth") or {}).get("gbps")
    ok = {(c["model"], c["mode"], c["backend"]): c for c in doc["cases"] if c.get("status") == "ok"}
    best = {}
    for c in doc["cases"]:
        if c.get("status") != "ok":
            continue
        c["pct_copy"] = 100.0 * c["gbps"] / copy if copy else None
        e = ok.get((c["model"], c["mode"], "eager"))
        c["speedup_vs_eager"] = e["ms_p50"] / c["ms_p50"] if e else None
        if c["backend"] in ("triton", "cuda") and c["check"]["ok"]:
            key = f'{c["model"]}|{c["mode"]}'
            if key not in best or c["ms_p50"] < best[key]["ms_p50"]:
                best[key] = dict(backend=c["backend"], ms_p50=c["ms_p50"])
    doc["fastest_fused"] = best


def summary_text(doc: dict) -> str:
    lines = []
    dev = doc.get("device", {}).get("name", "?")
    cb = doc.get("copy_bandwidth") or {}
    lines.append(f"token_pool benchmark on {dev} ({doc.get('config', {}).get('dtype')}), commit "
                 f"{str(doc.get('git_commit', '?'))[:10]}, {doc.get('date')}")
    if cb:
        lines.append(f"copy bandwidth: {cb.get('gbps', 0):.0f} GB/s ({cb.get('what', '')})")
    backends = [b for b in ALL_BACKENDS if any(c["backend"] == b for c in doc["cases"])]
    head = f"{'model':<17} {'mode':<8}" + "".join(f"{b:>22}" for b in backends)
    lines += ["GB/s (% of copy, x vs eager); skip / - = not run; ! = output check failed", head, "-" * len(head)]
    rows: dict = {}
    for c in doc["cases"]:
        rows.setdefault((c["model"], c["mode"]), {})[c["backend"]] = c
    for (model, mode), cs in rows.items():
        cells = []
        for b in backends:
            c = cs.get(b)
            if c is None or c.get("status") == "not_run":
                cells.append("-")
            elif c.get("status") != "ok":
                cells.append("skip")
            else:
                pct = c.get("pct_copy")
                sp = c.get("speedup_vs_eager")
                cell = f"{c['gbps']:.3g}"
                cell += f" ({pct:.0f}%" if pct is not None else " (?"
                cell += f", {sp:.1f}x)" if sp is not None else ")"
                if not c.get("check", {}).get("ok", True):
                    cell += "!"
                cells.append(cell)
        lines.append(f"{model:<17} {mode:<8}" + "".join(f"{s:>22}" for s in cells))
    fast = doc.get("fastest_fused") or {}
    if fast:
        lines.append("faster fused backend: " + ", ".join(f"{k}: {v['backend']}" for k, v in sorted(fast.items())))
    skipped = [c for c in doc["cases"] if c.get("status") == "skipped"]
    seen = set()
    for c in skipped:
        key = (c["backend"], c.get("reason", "")[:160])
        if key not in seen:
            seen.add(key)
            lines.append(f"skipped {c['backend']}: {c.get('reason', '')[:300]}")
    if doc.get("fatal_backends"):
        lines.append(f"fatal: {doc['fatal_backends']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def _finite(v):
    """JSON has no NaN/Infinity: non-finite floats become strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _csv(s):
    return [v.strip() for v in str(s).split(",") if v.strip()] if s else []


def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="token_pool_bench.json", help="output JSON (rewritten after every case)")
    p.add_argument("--device", default=env("MMK_POOL_DEVICE", "auto"), choices=["auto", "cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="fewer timing reps; on CPU small shapes (seconds)")
    p.add_argument("--dtype", default=env("MMK_POOL_DTYPE"), choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--models", default=env("MMK_POOL_MODELS", ",".join(MODELS)))
    p.add_argument("--modes", default=env("MMK_POOL_MODES", ",".join(MODES)))
    p.add_argument("--backends", default=env("MMK_POOL_BACKENDS"),
                   help="default: eager,triton,cuda,compile on CUDA; eager,reference on CPU")
    p.add_argument("--exclude", default=env("MMK_POOL_EXCLUDE", ""))
    p.add_argument("--warmup-ms", type=float, default=None)
    p.add_argument("--rep-ms", type=float, default=None)
    p.add_argument("--copy-mib", type=int, default=None,
                   help="size of the copy-bandwidth probe (default 1024 CUDA, 64 CPU)")
    p.add_argument("--budget-s", type=float, default=float(env("MMK_POOL_BUDGET_S", "0") or 0),
                   help="start no case after this many seconds (0 = no limit); the rest is not_run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="keep the ok/skipped cases of --json, run the rest")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of skipped cases")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.json)
    if args.summary_only:
        print(summary_text(json.loads(path.read_text())))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    cpu = device.type == "cpu"
    if cpu and args.quick:
        # a smoke run: one thread (measured: OpenMP's spinning threads turn 0.1 ms calls into
        # 12 ms on a loaded 2-core machine)
        torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    table = QUICK_CPU if (cpu and args.quick) else MODELS
    models = [table[n] for n in _csv(args.models) if n in table]
    unknown = [n for n in _csv(args.models) if n not in table]
    if unknown:
        print(f"--models: unknown {unknown}, expected {list(MODELS)}", file=sys.stderr)
        return 2
    modes = [md for md in _csv(args.modes) if md in MODES]
    backends = _csv(args.backends) or (["eager", "reference"] if cpu else ["eager", "triton", "cuda", "compile"])
    bad = [b for b in backends if b not in ALL_BACKENDS]
    if bad or not modes:
        print(f"--backends/--modes: unknown {bad or args.modes}", file=sys.stderr)
        return 2
    backends = [b for b in backends if b not in set(_csv(args.exclude))]
    if args.warmup_ms is None:
        args.warmup_ms = 5.0 if cpu else (10.0 if args.quick else 25.0)
    if args.rep_ms is None:
        args.rep_ms = 20.0 if cpu else (40.0 if args.quick else 100.0)
    copy_mib = args.copy_mib or (64 if cpu else 1024)

    env = describe_env(device)
    commit, dirty = _git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    doc = {
        "benchmark": "token_pool (issue 4)", "schema": SCHEMA, "date": now.isoformat(timespec="seconds"),
        "git_commit": commit, "git_dirty": dirty, **env,
        "config": dict(dtype=str(dtype).replace("torch.", ""), models={m.name: m.__dict__ for m in models},
                       modes=modes, backends=backends, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                       quick=args.quick, seed=args.seed),
        "byte_convention": BYTE_CONVENTION,
        "suggested_result_path": f"benchmarks/results/{_slug(env['device'].get('name', device.type))}/"
                                 f"token_pool_{now.strftime('%Y%m%d')}_{commit[:7]}.json",
        "copy_bandwidth": None, "backends": {}, "fatal_backends": {}, "runs": [], "cases": [],
    }
    done: dict = {}
    if args.resume and path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("device", {}).get("name") == env["device"].get("name") and \
                    old.get("config", {}).get("dtype") == doc["config"]["dtype"]:
                done = {c["key"]: c for c in old.get("cases", []) if c.get("status") in ("ok", "skipped")}
                doc["fatal_backends"] = old.get("fatal_backends", {})
                doc["runs"] = old.get("runs", [])
                doc["copy_bandwidth"] = old.get("copy_bandwidth")
        except Exception as exc:
            print(f"--resume: cannot read {path} ({exc}); starting afresh", flush=True)
    doc["runs"].append(dict(argv=sys.argv[1:] if argv is None else list(argv), started=doc["date"]))

    def save():
        finish(doc)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(_finite(doc), indent=1, default=str))
        tmp.replace(path)

    path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    if doc["copy_bandwidth"] is None:
        try:
            doc["copy_bandwidth"] = copy_bandwidth(device, copy_mib, args.warmup_ms, args.rep_ms)
            print(f"copy bandwidth: {doc['copy_bandwidth']['gbps']:.0f} GB/s", flush=True)
        except Exception as exc:
            doc["copy_bandwidth"] = {"error": f"{type(exc).__name__}: {exc}"}
    for b in backends:
        why = doc["fatal_backends"].get(b) or backend_unavailable(b, device)
        doc["backends"][b] = {"available": why is None, "reason": why}
    save()

    refs: dict = {}
    fns: dict = {}
    plan = [(tier, m, md, b) for tier in (0, 1) for m in models for md in modes for b in backends
            if TIER.get(b, 1) == tier]
    rc = 0
    for _, m, md, b in plan:
        key = f"{m.name}|{md}|{b}"
        rec = dict(key=key, model=m.name, what=m.what, mode=md, backend=b, B=m.B, N=m.N, C=m.C, h=m.h, w=m.w,
                   dtype=doc["config"]["dtype"], status="not_run", reason=None)
        if key in done:
            doc["cases"].append(done[key])
            continue
        doc["cases"].append(rec)
        why = doc["backends"][b]["reason"]
        if why:
            rec.update(status="skipped", reason=why)
            save()
            continue
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            rec["reason"] = f"time budget of {args.budget_s:.0f} s used up"
            save()
            continue
        try:
            if m.name not in refs:
                refs[m.name] = reference_out(m, device, dtype, args.seed)
            if (m.name, b) not in fns:
                fns[(m.name, b)] = make_fn(b, m)
            run_case(rec, m, fns[(m.name, b)], device, dtype, args, refs[m.name])
            ck = rec["check"]
            print(f"{m.name:<17} {md:<8} {b:<9} {rec['ms_p50']:9.4f} ms  {rec['gbps']:8.1f} GB/s"
                  f"  rel err {ck['rel']:.2e}{'' if ck['ok'] else '  WRONG'}", flush=True)
        except Exception as exc:
            rec.update(status="skipped", reason=f"{type(exc).__name__}: {str(exc)[:1500]}")
            print(f"{m.name:<17} {md:<8} {b:<9} skipped: {rec['reason'][:200]}", flush=True)
            if args.verbose:
                traceback.print_exc()
            if not _cuda_alive(device):  # the context is poisoned: nothing after this can run
                doc["fatal_backends"][b] = rec["reason"][:500]
                save()
                print(f"fatal CUDA error in backend {b!r}; rerun with --resume to skip it", file=sys.stderr)
                return EXIT_FATAL
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        save()
    save()
    print(summary_text(doc), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
