#!/usr/bin/env python
"""Attention benchmark (issue 2): mmkernels' Triton kernel against every attention torch offers.

Problem family (bf16 on CUDA): B·L = 16384 tokens, H·d = 2048, d ∈ {64, 128, 88}
(H = 2048 // d; for d = 88, H = 23 and H·d = 2024 since 2048 is no multiple of 88),
L ∈ {512 … 16384} with B = 16384 // L, causal and not, forward and forward+backward.

Backends: ``triton`` (``mmkernels.attention(..., backend="triton")``), ``sdpa-flash``,
``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math`` (``F.scaled_dot_product_attention`` inside
``torch.nn.attention.sdpa_kernel``), ``flex`` (FlexAttention under ``torch.compile``, causal as a
block mask), ``flash-attn`` and ``xformers`` (only when importable), and ``eager``
(``mmkernels.reference.attention.attention``: matmul + softmax + matmul).

Every case is wrapped: an unsupported combination, an out-of-memory or a compile failure is
recorded as ``skipped`` with the exception text and the run goes on.  The JSON is rewritten after
every case, so a run killed by a timeout keeps what it measured; ``--resume`` continues it.  A
CUDA error that poisons the context (illegal address, device assert) ends the process with exit
code 3 after naming the backend in ``fatal_backends``; a case that hangs past
``--case-timeout-s`` is killed by a watchdog (exit code 1) and marked.  ``--resume`` skips both.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call) median and
20/80 % quantiles, after a first untimed call that pays compilation/autotuning.  fwd+bwd times
``out = f(q, k, v); out.backward(dout)`` with one fixed random ``dout``; grads are reset to
None before every call.  Inputs are fresh ``randn`` draws per shape (never zeros).

Correctness: every case's output (and, up to ``--grad-check-max-l``, its dQ/dK/dV) is compared
with a float64 reference computed on a slice (batch 0, the first two heads), so a fast but
wrong kernel shows in the table (``!`` in the summary).

Usage::

    python benchmarks/bench_attention.py --json OUT.json             # full issue-2 sweep, CUDA
    python benchmarks/bench_attention.py --json OUT.json --quick     # reduced sweep
    python benchmarks/bench_attention.py --json OUT.json --device cpu --quick     # seconds, CPU
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --json o.json --device cpu --quick
    python benchmarks/bench_attention.py --json OUT.json --summary-only   # reprint the tables

Case selection also comes from the environment (``MMK_BENCH_D``, ``MMK_BENCH_L``,
``MMK_BENCH_BACKENDS``, ``MMK_BENCH_EXCLUDE``, ``MMK_BENCH_MODES``, ``MMK_BENCH_CAUSAL``,
``MMK_BENCH_BUDGET_S``, ...), so ``scripts/gpu_check.sh`` can fit a run into one lease.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

# `python benchmarks/bench_attention.py` from a checkout benchmarks the checkout, installed or not
_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

# the backends, the timers and the environment description live in mmkernels.bench, shared
# with the `mmkernels bench` command; this script keeps the issue-2 sweep, --resume, budgets
from mmkernels.bench import env as _env  # noqa: E402
from mmkernels.bench import timing as _timing  # noqa: E402
from mmkernels.bench.cases_attention import (  # noqa: E402,F401  (Backend/Prepared: re-exported)
    Backend,
    Prepared,
    _from_layout,
    _to_layout,
    make_backends,
    ref_out_slice,
)
from mmkernels.bench.report import json_safe, short_text  # noqa: E402
from mmkernels.bench.runner import cuda_alive, exc_text, peak_memory, warning_messages  # noqa: E402

SCHEMA = 1
ALL_BACKENDS = ("eager", "sdpa-flash", "triton", "triton-pad", "sdpa-cudnn", "sdpa-efficient",
                "flex", "flash-attn", "xformers", "sdpa-math")
# Tier 0 runs over every shape before tier 1 starts: when the time budget runs out, the
# comparison that matters (triton vs flash vs eager) is complete and the slow-to-compile
# (flex) or slow-to-run (math) backends are what is cut.
TIER = {"eager": 0, "sdpa-flash": 0, "triton": 0, "triton-pad": 0, "sdpa-cudnn": 0, "sdpa-efficient": 0,
        "flex": 1, "flash-attn": 1, "xformers": 1, "sdpa-math": 1}
MODES = ("fwd", "fwd+bwd")
FLOP_CONVENTION = (
    "fwd = 4*B*H*Lq*Lk*d (QK^T and PV, 2 FLOPs per multiply-add), halved when causal; "
    "bwd = 2.5 * fwd (five matmuls); fwd+bwd = 3.5 * fwd; softmax/exp not counted "
    "(the FlashAttention papers' convention)"
)
COLUMNS = {
    "ms_p50 / ms_p20 / ms_p80": "median and 20/80 % quantiles of one call, milliseconds (fwd+bwd: forward + backward)",
    "tflops": "flops / ms_p50, 1e12 FLOP/s, with the flop convention above",
    "speedup_vs_eager": "eager ms_p50 / this ms_p50 at the same (d, L, causal, mode); null when eager did not run",
    "speedup_vs_sdpa_flash": "sdpa-flash ms_p50 / this ms_p50 at the same (d, L, causal, mode)",
    "peak_mem_mib": "torch.cuda.max_memory_allocated during one call (inputs, dout and grads included)",
    "extra_mem_mib": "peak_mem_mib minus memory allocated just before the call (what the call itself needs)",
    "check": "float64 reference on batch 0, heads 0..1: max abs / relative (Frobenius) error of out and grads",
    "status": "ok | skipped (exception text in reason) | not_run (time budget)",
}
# relative (Frobenius) error bounds for check.ok: ~3x what plain PyTorch gets in the dtype
OUT_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-3}
GRAD_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1.5e-2, torch.float32: 5e-3}
CHECK_HEADS = 2
GIB = 1 << 30
EXIT_FATAL = 3


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _csv(s, cast=str):
    if s is None or s == "":
        return []
    if isinstance(s, (list, tuple)):
        return [cast(x) for x in s]
    return [cast(x.strip()) for x in str(s).split(",") if x.strip()]


# --------------------------------------------------------------------------------------
# environment description
# --------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    backend: str
    d: int
    L: int
    causal: bool
    mode: str
    B: int
    H: int

    @property
    def key(self) -> str:
        return f"{self.backend}|d{self.d}|L{self.L}|{'causal' if self.causal else 'full'}|{self.mode}"

    @property
    def shape_key(self):
        return (self.d, self.L, self.causal, self.mode)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.d)

    # what the shared backends (mmkernels.bench.cases_attention) read
    Lq = property(lambda self: self.L)
    Lk = property(lambda self: self.L)
    mask = None

    def flops(self) -> float:
        fwd = 4.0 * self.B * self.H * self.L * self.L * self.d * (0.5 if self.causal else 1.0)
        return fwd * (3.5 if self.mode == "fwd+bwd" else 1.0)


def plan(args, backend_names) -> list[Case]:
    cases = []
    for tier in (0, 1):
        names = [b for b in backend_names if TIER.get(b, 1) == tier]
        for d in args.d:
            H = max(1, args.hidden // d)
            for L in args.L:
                B = max(1, args.tokens // L)
                for causal in args.causal:
                    for mode in args.modes:
                        for name in names:
                            cases.append(Case(name, d, L, causal, mode, B, H))
    return cases


def base_record(case: Case, dtype) -> dict:
    return dict(key=case.key, op="attention", backend=case.backend, d=case.d, H=case.H, B=case.B,
                L=case.L, Lq=case.L, Lk=case.L, hidden=case.H * case.d, causal=case.causal,
                mode=case.mode, dtype=str(dtype).replace("torch.", ""), flops=case.flops(),
                status="not_run", reason=None)


# --------------------------------------------------------------------------------------
# reference (float64 on a slice)
# --------------------------------------------------------------------------------------
def ref_grads_slice(q, k, v, dout, causal, scale, nh):
    """float64 (dq, dk, dv) of batch 0, heads [0, nh) (full L×L: call for small L only)."""
    qs, ks, vs = (t[0:1, :nh].detach().double().requires_grad_() for t in (q, k, v))
    s = torch.matmul(qs, ks.transpose(-1, -2)) * scale
    if causal:
        L = s.shape[-1]
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), vs)
    out.backward(dout[0:1, :nh].double())
    return qs.grad[0], ks.grad[0], vs.grad[0]


def _err(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (got.double() - ref).abs()
    den = ref.norm().item()
    return diff.max().item(), (diff.norm().item() / den) if den > 0 else diff.norm().item()


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------
# running one case
# --------------------------------------------------------------------------------------
class Inputs:
    """Fresh random q, k, v, dout for one (d, L) and cached float64 references."""

    def __init__(self):
        self.key = None
        self.q = self.k = self.v = self.dout = None
        self.refs = {}

    def get(self, case: Case, device, dtype, seed):
        key = (case.d, case.L, case.B, case.H)
        if key != self.key:
            self.q = self.k = self.v = self.dout = None
            self.refs = {}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            g = torch.Generator(device=device)
            g.manual_seed(seed * 1_000_003 + case.d * 100_003 + case.L)
            shape = (case.B, case.H, case.L, case.d)
            self.q, self.k, self.v, self.dout = (
                torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype) for _ in range(4))
            self.key = key
        return self

    def ref_out(self, causal, scale, nh):
        k = ("out", causal)
        if k not in self.refs:
            self.refs[k] = ref_out_slice(self.q, self.k, self.v, causal, scale, nh)
        return self.refs[k]

    def ref_grads(self, causal, scale, nh):
        k = ("grads", causal)
        if k not in self.refs:
            self.refs[k] = ref_grads_slice(self.q, self.k, self.v, self.dout, causal, scale, nh)
        return self.refs[k]


def run_case(case: Case, backend: Backend, inputs: Inputs, args, device, dtype, rec: dict) -> dict:
    """Fills `rec`; every exception becomes status 'skipped' with its text."""
    caught: list = []
    prepared = out = leaves = dout = None
    try:
        if backend.score_itemsize is not None:
            # eager and math materialise B·H·L·L scores; their peak holds ~3 such tensors
            # forward and ~6 with autograd (measured on the reference: scores, shifted, exp, probs)
            factor = 3 if case.mode == "fwd" else 6
            need = factor * case.B * case.H * case.L * case.L * backend.score_itemsize
            limit = args.eager_max_gib * GIB
            if device.type == "cuda":
                try:  # free on the device plus what torch's caching allocator holds unused
                    free = (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
                            - torch.cuda.memory_allocated(device))
                    limit = min(limit, 0.85 * free)
                except Exception:
                    pass
            if need > limit:
                rec.update(status="skipped", reason=(
                    f"needs ~{need / GIB:.1f} GiB for the L×L scores ({factor} × B·H·L² × "
                    f"{backend.score_itemsize} B) > limit {limit / GIB:.1f} GiB (--eager-max-gib)"))
                return rec
        inp = inputs.get(case, device, dtype, args.seed)
        grad = case.mode == "fwd+bwd"
        with backend.context(), warnings.catch_warnings(record=True) as caught:
            # warnings of the first call are recorded (SDPA explains a refusal only through
            # them); from the checks on they are ignored, so a per-call warning costs no time
            warnings.simplefilter("always")
            prepared = backend.prepare(case, device)
            call, layout = prepared.call, prepared.layout
            # fresh leaf aliases per case: .grad lives on these objects, never on the cached inputs
            leaves = [_to_layout(t, layout).detach().requires_grad_(grad) for t in (inp.q, inp.k, inp.v)]
            dout = _to_layout(inp.dout, layout) if grad else None

            if grad:
                def fn():
                    call(*leaves).backward(dout)
            else:
                def fn():
                    return call(*leaves)

            # 1) first call: compilation / autotuning, and the output the checks read
            t0 = time.perf_counter()
            out = call(*leaves)
            if grad:
                out.backward(dout)
            _timing.sync(device)
            rec["first_call_s"] = round(time.perf_counter() - t0, 3)
            warnings.simplefilter("ignore")

            # 2) correctness against float64 on batch 0, heads 0..nh-1
            nh = min(CHECK_HEADS, case.H)
            o = _from_layout(out.detach(), layout)
            chk: dict = {"ref": f"float64, batch 0, heads 0..{nh - 1}", "finite": bool(torch.isfinite(o).all().item())}
            chk["out_max_abs_err"], chk["out_rel_err"] = _err(o[0, :nh], inp.ref_out(case.causal, case.scale, nh))
            ok = chk["finite"] and chk["out_rel_err"] <= OUT_RTOL.get(dtype, 2e-2)
            if grad and (case.L <= args.grad_check_max_l or case.L == min(args.L)):
                refs = inp.ref_grads(case.causal, case.scale, nh)
                for name, leaf, ref in zip(("dq", "dk", "dv"), leaves, refs, strict=True):
                    if leaf.grad is None:
                        chk[f"{name}_max_abs_err"], ok = None, False
                        continue
                    gg = _from_layout(leaf.grad, layout)
                    chk["finite"] = chk["finite"] and bool(torch.isfinite(gg).all().item())
                    chk[f"{name}_max_abs_err"], chk[f"{name}_rel_err"] = _err(gg[0, :nh], ref)
                    ok = ok and chk[f"{name}_rel_err"] <= GRAD_RTOL.get(dtype, 5e-2)
                ok = ok and chk["finite"]
            chk["ok"] = bool(ok)
            rec["check"] = chk
            del o
            out = None
            _timing.reset_grads(leaves)

            # 3) timing
            t = _timing.time_fn(fn, device, grads=leaves if grad else [], warmup_ms=args.warmup_ms,
                                rep_ms=args.rep_ms, min_reps=args.min_reps)
            p50 = t.ms_p50
            rec.update(ms_p50=p50, ms_p20=t.ms_p20, ms_p80=t.ms_p80, timer=t.timer,
                       tflops=case.flops() / (p50 * 1e-3) / 1e12 if p50 > 0 else None)

            # 4) peak memory of one call
            if device.type == "cuda":
                rec["peak_mem_mib"], rec["extra_mem_mib"] = peak_memory(fn, leaves, device)
            rec["status"] = "ok"
            ws = warning_messages(caught, 300)
            if ws:
                rec["warnings"] = ws[:5]
    except Exception as exc:
        reason = exc_text(exc, caught, per_warning=400, max_warnings=6, limit=2000)
        rec.update(status="skipped", reason=reason, error_type=type(exc).__name__)
        if args.verbose:
            traceback.print_exc()
    finally:
        out = prepared = dout = None
        if leaves is not None:
            _timing.reset_grads(leaves)
        leaves = None
        if rec.get("status") != "ok" and device.type == "cuda":
            gc.collect()
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    return rec


# --------------------------------------------------------------------------------------
# results: speedups, tables, JSON
# --------------------------------------------------------------------------------------
def add_speedups(cases: list[dict]) -> None:
    by = {}
    for c in cases:
        if c.get("status") == "ok":
            by[(c["d"], c["L"], c["causal"], c["mode"], c["backend"])] = c["ms_p50"]
    for c in cases:
        for peer, field in (("eager", "speedup_vs_eager"), ("sdpa-flash", "speedup_vs_sdpa_flash")):
            ref = by.get((c["d"], c["L"], c["causal"], c["mode"], peer))
            c[field] = (ref / c["ms_p50"]) if (c.get("status") == "ok" and ref and c.get("ms_p50")) else None


def row_header() -> str:
    return (f"{'backend':<15}{'d':>4}{'H':>4}{'B':>5}{'L':>7} {'mask':<7}{'mode':<8}"
            f"{'p50 ms':>10}{'p20':>9}{'p80':>9}{'TFLOP/s':>9}{'peak MiB':>10}{'max|err|':>10}  status")


def row_text(r: dict) -> str:
    head = (f"{r['backend']:<15}{r['d']:>4}{r['H']:>4}{r['B']:>5}{r['L']:>7} "
            f"{'causal' if r['causal'] else 'full':<7}{r['mode']:<8}")
    if r.get("status") != "ok":
        return head + f"{r.get('status')}: {short_text(r.get('reason') or '', 110)}"
    chk = r.get("check") or {}
    err = chk.get("out_max_abs_err")
    flag = "ok" if chk.get("ok", True) else "WRONG (rel err " + _fmt_e(chk.get("out_rel_err")) + ")"
    mem = r.get("peak_mem_mib")
    return head + (f"{r['ms_p50']:>10.3f}{r['ms_p20']:>9.3f}{r['ms_p80']:>9.3f}"
                   f"{_fmt_tf(r.get('tflops')):>9}{(f'{mem:.0f}' if mem is not None else '-'):>10}"
                   f"{_fmt_e(err):>10}  {flag}")


def _fmt_e(x):
    return f"{x:.1e}" if isinstance(x, (int, float)) else "-"


def _fmt_tf(x):
    """TFLOP/s: one decimal on a GPU, three significant digits for the tiny CPU numbers."""
    if not isinstance(x, (int, float)):
        return "-"
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def summary_text(doc: dict) -> str:
    """Pivot: one row per (d, L, mask, mode), TFLOP/s per backend, triton speedups last."""
    cases = doc.get("cases", [])
    backends = [b for b in ALL_BACKENDS if any(c["backend"] == b for c in cases)]
    rows = {}
    for c in cases:
        rows.setdefault((c["d"], c["L"], c["causal"], c["mode"]), {})[c["backend"]] = c
    lines = [f"TFLOP/s ({doc.get('config', {}).get('dtype', '?')}, {doc.get('device', {}).get('name', '?')}; "
             "'!' = failed the float64 check, 'skip' = skipped (see JSON reason), '-' = not run; "
             "x = triton speedup)"]
    hdr = f"{'d':>4}{'H':>4}{'L':>7} {'mask':<7}{'mode':<8}" + "".join(f"{b[:10]:>11}" for b in backends)
    hdr += f"{'x eager':>9}{'x flash':>9}"
    lines.append(hdr)
    for key in sorted(rows, key=lambda k: (k[0], k[3], k[2], k[1])):
        d, L, causal, mode = key
        r = rows[key]
        H = next(iter(r.values()))["H"]
        cells = []
        for b in backends:
            c = r.get(b)
            if c is None or c.get("status") == "not_run":
                cells.append("-")
            elif c.get("status") != "ok":
                cells.append("skip")
            else:
                bad = not (c.get("check") or {}).get("ok", True)
                cells.append(_fmt_tf(c.get("tflops")) + ("!" if bad else ""))
        t = r.get("triton") or {}
        sx = lambda v: (f"{v:.2f}" if v >= 0.1 else f"{v:.2g}") if isinstance(v, (int, float)) else "-"  # noqa: E731
        lines.append(f"{d:>4}{H:>4}{L:>7} {'causal' if causal else 'full':<7}{mode:<8}"
                     + "".join(f"{c:>11}" for c in cells)
                     + f"{sx(t.get('speedup_vs_eager')):>9}{sx(t.get('speedup_vs_sdpa_flash')):>9}")
    n = {s: sum(1 for c in cases if c.get("status") == s) for s in ("ok", "skipped", "not_run")}
    wrong = [c["key"] for c in cases if c.get("status") == "ok" and not (c.get("check") or {}).get("ok", True)]
    lines.append(f"cases: {n['ok']} ok, {n['skipped']} skipped, {n['not_run']} not run; "
                 f"{len(wrong)} failed the correctness check" + (f": {', '.join(wrong[:12])}" if wrong else ""))
    for name, why in (doc.get("fatal_backends") or {}).items():
        lines.append(f"fatal: {name}: {short_text(why, 200)}")
    for name, info in (doc.get("backends") or {}).items():
        if not info.get("available", True):
            lines.append(f"unavailable: {name}: {short_text(info.get('reason', ''), 150)}")
    return "\n".join(lines)


def write_json(path: Path, doc: dict) -> None:
    add_speedups(doc["cases"])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(json_safe(doc), f, indent=1)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous version


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="output JSON path (rewritten after every case)")
    p.add_argument("--quick", action="store_true", default=env("MMK_BENCH_QUICK", "") == "1",
                   help="reduced sweep (CPU: tiny shapes in fp32, seconds)")
    p.add_argument("--device", default=env("MMK_BENCH_DEVICE", "auto"), choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default=env("MMK_BENCH_DTYPE"), choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--d", default=env("MMK_BENCH_D"), help="head dims, comma-separated (default 64,128,88)")
    p.add_argument("--L", default=env("MMK_BENCH_L"), help="sequence lengths (default 512..16384)")
    p.add_argument("--tokens", type=int, default=env("MMK_BENCH_TOKENS"), help="B·L (default 16384)")
    p.add_argument("--hidden", type=int, default=env("MMK_BENCH_HIDDEN"),
                   help="H·d target; H = hidden // d (default 2048)")
    p.add_argument("--causal", default=env("MMK_BENCH_CAUSAL", "0,1"), help="0,1 | 0 | 1")
    p.add_argument("--modes", default=env("MMK_BENCH_MODES", ",".join(MODES)), help="fwd,fwd+bwd")
    p.add_argument("--backends", default=env("MMK_BENCH_BACKENDS"),
                   help=f"subset of {','.join(ALL_BACKENDS)} (default: all on CUDA; eager,sdpa-math,triton on CPU)")
    p.add_argument("--exclude", default=env("MMK_BENCH_EXCLUDE", ""), help="backends to leave out")
    p.add_argument("--warmup-ms", type=float, default=env("MMK_BENCH_WARMUP_MS"))
    p.add_argument("--rep-ms", type=float, default=env("MMK_BENCH_REP_MS"))
    p.add_argument("--min-reps", type=int, default=None, help="host timer only (CPU)")
    p.add_argument("--budget-s", type=float, default=float(env("MMK_BENCH_BUDGET_S", "0") or 0),
                   help="start no new case after this many seconds (0 = no limit); the rest is recorded not_run")
    p.add_argument("--case-timeout-s", type=float, default=float(env("MMK_BENCH_CASE_TIMEOUT_S", "300")),
                   help="watchdog: a case running longer kills the process (exit 1); --resume skips it")
    p.add_argument("--eager-max-gib", type=float, default=float(env("MMK_BENCH_EAGER_MAX_GIB", "20")),
                   help="skip eager / sdpa-math when their L×L score tensors would need more")
    p.add_argument("--grad-check-max-l", type=int, default=int(env("MMK_BENCH_GRAD_CHECK_MAX_L", "2048")),
                   help="check dQ/dK/dV against float64 up to this L (and always at the smallest L)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", default=env("MMK_BENCH_RESUME", "") == "1",
                   help="keep the cases already in --json (ok/skipped) and run the rest")
    p.add_argument("--summary-only", action="store_true", help="print the summary of --json and exit")
    p.add_argument("--dry-run", action="store_true", help="print the planned cases and exit")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of skipped cases")
    args = p.parse_args(argv)
    return args


def resolve(args):
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    quick_cpu = cpu and args.quick
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    dtype = getattr(torch, args.dtype)
    args.d = _csv(args.d, int) or ([64, 88] if quick_cpu else [64, 128, 88])
    args.L = _csv(args.L, int) or ([64, 128] if quick_cpu else [1024, 4096] if args.quick
                                   else [512, 1024, 2048, 4096, 8192, 16384])
    args.tokens = args.tokens or (256 if quick_cpu else 16384)
    args.hidden = args.hidden or (128 if quick_cpu else 2048)
    args.causal = [bool(int(x)) for x in _csv(args.causal)] or [False, True]
    args.modes = _csv(args.modes) or list(MODES)
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}, expected {MODES}")
    default_b = ["eager", "sdpa-math", "triton"] if cpu else list(ALL_BACKENDS)
    args.backends = _csv(args.backends) or default_b
    excl = set(_csv(args.exclude))
    unknown = [b for b in list(args.backends) + list(excl) if b not in ALL_BACKENDS]
    if unknown:
        raise SystemExit(f"--backends/--exclude: unknown {unknown}, expected {ALL_BACKENDS}")
    args.backends = [b for b in args.backends if b not in excl]
    if args.warmup_ms is None:
        args.warmup_ms = 5.0 if cpu else (10.0 if args.quick else 25.0)
    if args.rep_ms is None:
        args.rep_ms = 20.0 if cpu else (40.0 if args.quick else 100.0)
    if args.min_reps is None:
        args.min_reps = 5
    return device, dtype


def main(argv=None) -> int:
    args = parse_args(argv)
    path = Path(args.json)
    if args.summary_only:
        print(summary_text(json.loads(path.read_text())))
        return 0
    device, dtype = resolve(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2

    backends = make_backends(dtype)
    env_info = _env.describe(device, nvidia_smi=True)
    commit, dirty = _env.git_commit()
    now = datetime.datetime.now(datetime.timezone.utc)
    dev_name = env_info["device"].get("name", device.type)
    doc = {
        "benchmark": "attention (issue 2)",
        "schema": SCHEMA,
        "date": now.isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": dirty,
        **env_info,
        "config": dict(dtype=args.dtype, tokens=args.tokens, hidden=args.hidden, d=args.d, L=args.L,
                       causal=args.causal, modes=args.modes, backends=args.backends,
                       warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, eager_max_gib=args.eager_max_gib,
                       grad_check_max_l=args.grad_check_max_l, quick=args.quick, seed=args.seed,
                       float32_matmul_precision=torch.get_float32_matmul_precision()),
        "flop_convention": FLOP_CONVENTION,
        "columns": COLUMNS,
        "notes": [],
        "suggested_result_path": (f"benchmarks/results/{_env.slug(dev_name)}/attention_"
                                  f"{now.strftime('%Y%m%d')}_{commit[:7]}.json"),
        "backends": {},
        "fatal_backends": {},
        "deaths": {},
        "running": None,
        "runs": [],
        "cases": [],
    }
    for d in args.d:
        H = max(1, args.hidden // d)
        if H * d != args.hidden:
            doc["notes"].append(f"d={d}: H = {args.hidden} // {d} = {H}, so H·d = {H * d} (not {args.hidden})")
    for L in args.L:
        if args.tokens % L:
            doc["notes"].append(f"L={L}: B = max(1, {args.tokens} // {L}) = {max(1, args.tokens // L)}, "
                                f"so B·L = {max(1, args.tokens // L) * L} (not {args.tokens})")

    done: dict[str, dict] = {}
    if args.resume and path.exists():
        try:
            old = json.loads(path.read_text())
            same = (old.get("device", {}).get("name") == dev_name
                    and all(old.get("config", {}).get(k) == doc["config"][k] for k in ("dtype", "tokens", "hidden")))
            if not same:
                print(f"--resume: {path} is from another device or config; starting afresh", flush=True)
            else:
                for c in old.get("cases", []):
                    done[c["key"]] = c
                doc["fatal_backends"] = old.get("fatal_backends") or {}
                doc["deaths"] = old.get("deaths") or {}
                doc["runs"] = old.get("runs") or []
                doc["notes"] = sorted(set(doc["notes"]) | set(old.get("notes") or []))
                dead = old.get("running")
                if dead:
                    # the previous process died inside this case (watchdog, timeout, crash)
                    b = dead.split("|")[0]
                    doc["deaths"][b] = doc["deaths"].get(b, 0) + 1
                    prev = done.get(dead, {})
                    prev.update(key=dead, status="skipped",
                                reason="the previous run died or hung in this case "
                                       "(watchdog/timeout/crash); not retried")
                    done[dead] = prev
                    if doc["deaths"][b] >= 2:
                        doc["fatal_backends"].setdefault(b, f"{doc['deaths'][b]} runs died in its cases")
                print(f"--resume: {sum(1 for c in done.values() if c.get('status') in ('ok', 'skipped'))} "
                      f"cases kept from {path}", flush=True)
        except Exception as exc:
            print(f"--resume: cannot read {path} ({exc!r}); starting afresh", flush=True)
            done = {}

    names = []
    for name in args.backends:
        why = backends[name].unavailable(device, dtype)
        doc["backends"][name] = {"available": why is None, "reason": why}
        if why is None:
            names.append(name)
        else:
            print(f"# {name}: unavailable: {why}", flush=True)
    cases = plan(args, names)

    if args.dry_run:
        for c in cases:
            print(c.key, f"B={c.B} H={c.H}")
        print(f"{len(cases)} cases")
        return 0

    # cases from an earlier run that this run does not plan stay in the document
    planned = {c.key for c in cases}
    extra = [c for k, c in done.items() if k not in planned and "backend" in c]
    records = {c.key: base_record(c, dtype) for c in cases}
    for k, c in done.items():
        if k in records and c.get("status") in ("ok", "skipped"):
            records[k] = {**records[k], **c}
    doc["cases"] = extra + list(records.values())
    run_info = {"started": doc["date"], "argv": sys.argv[1:], "budget_s": args.budget_s, "ended": None}
    doc["runs"].append(run_info)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, doc)

    print(f"# attention benchmark: {dev_name}, {args.dtype}, torch {torch.__version__}, "
          f"triton {env_info['versions'].get('triton')}, commit {commit[:12]}; {len(cases)} cases "
          f"({sum(1 for c in cases if records[c.key]['status'] != 'not_run')} kept from --resume)", flush=True)
    for n in doc["notes"]:
        print(f"# note: {n}", flush=True)
    print(row_header(), flush=True)

    t_start = time.perf_counter()
    inputs = Inputs()
    rc = 0
    for case in cases:
        rec = records[case.key]
        if rec["status"] in ("ok", "skipped"):
            continue
        if case.backend in doc["fatal_backends"]:
            why = doc["fatal_backends"][case.backend]
            rec.update(status="skipped", reason=f"backend disabled after a fatal error: {why}")
            print(row_text(rec), flush=True)
            continue
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            rec.update(status="not_run", reason=f"time budget of {args.budget_s:.0f} s spent")
            continue
        doc["running"] = case.key
        write_json(path, doc)
        if args.case_timeout_s > 0:
            faulthandler.dump_traceback_later(args.case_timeout_s, exit=True)
        try:
            run_case(case, backends[case.backend], inputs, args, device, dtype, rec)
        finally:
            if args.case_timeout_s > 0:
                faulthandler.cancel_dump_traceback_later()
        doc["running"] = None
        if rec["status"] != "ok" and not cuda_alive(device):
            doc["fatal_backends"][case.backend] = (f"CUDA context unusable after {case.key}: "
                                                   f"{short_text(rec['reason'], 600)}")
            print(row_text(rec), flush=True)
            print(f"# FATAL: the CUDA context is unusable after {case.key}; rerun with --resume "
                  f"(backend {case.backend} will be skipped)", flush=True)
            rc = EXIT_FATAL
            break
        print(row_text(rec), flush=True)
        write_json(path, doc)

    not_run = sum(1 for r in records.values() if r["status"] == "not_run")
    if not_run and rc == 0:
        print(f"# {not_run} cases not run (time budget); rerun with --resume to continue", flush=True)
    run_info["ended"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    run_info["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    write_json(path, doc)
    print("", flush=True)
    print(summary_text(doc), flush=True)
    print(f"# wrote {path}", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
