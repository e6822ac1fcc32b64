"""Runs an op's cases: plan, inputs, the float64 check, timing, memory, derived columns.

A row per (shape, dtype, mode, backend), ``status`` ok | skipped | not_run. A failing case (an
unsupported combination, an out-of-memory, a compile error) is ``skipped`` with the exception text
and the warnings that explain it (SDPA explains a refusal only through warnings). A CUDA error that
poisons the context stops the run: the rest is ``not_run``, reported as fatal. Resuming keeps an
earlier run's ok/skipped rows and skips the case it died in, so every rerun makes progress.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import timing
from .cases import OpBench, ShapeSpec, short_text
from .env import percent_of

__all__ = ["MODES", "RunConfig", "case_key", "plan", "run"]

MODES = ("fwd", "bwd", "fwd+bwd")
MIB = 1 << 20


@dataclass
class RunConfig:
    device: Any
    modes: list[str] = field(default_factory=lambda: ["fwd"])
    backends: list[str] = field(default_factory=list)
    dtype: str | None = None  # None: each shape's own dtype, else the device's default
    quick: bool = False
    warmup_ms: float | None = None
    rep_ms: float | None = None
    min_reps: int = 5
    seed: int = 0
    rotate: bool = True
    ceilings: dict | None = None
    verbose: bool = False
    budget_s: float | None = None  # start no case after this many seconds; the rest is not_run
    case_timeout_s: float | None = None  # watchdog: a case running longer ends the process (exit 1)
    timer: Callable | None = None  # (fn, device, grads, **kw) -> Timing; default timing.time_fn

    def __post_init__(self):
        import torch

        self.device = torch.device(self.device)
        cpu = self.device.type == "cpu"
        if self.warmup_ms is None:
            self.warmup_ms = (2.0 if self.quick else 10.0) if cpu else (10.0 if self.quick else 25.0)
        if self.rep_ms is None:
            self.rep_ms = (10.0 if self.quick else 50.0) if cpu else (40.0 if self.quick else 100.0)
        if self.quick and cpu:
            self.min_reps = min(self.min_reps, 3)
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"--mode: unknown {bad}, expected {MODES}")


def case_key(op: str, spec: ShapeSpec, dtype: str, mode: str, backend: str) -> str:
    """A case's identity across runs: what ``mmkernels bench compare`` and ``--resume`` match on."""
    return f"{op}/{spec.preset}/{spec.id}/{dtype}/{mode}/{backend}"


def plan(op: OpBench, presets: list[str], custom: list[ShapeSpec], device, *, quick: bool,
         full_size: bool = False) -> tuple[list[ShapeSpec], dict[str, str], list[str]]:
    """(shapes to run, {preset: why it has none}, notes). On the CPU the shapes are shrunk unless
    ``full_size``; a shape equal to an earlier one (EVA ViT-g in blip2 and instructblip; presets
    that shrink to the same CPU shape) is timed once, and a note says so."""
    import torch

    specs: list[ShapeSpec] = []
    skipped: dict[str, str] = {}
    for p in presets:
        got = op.preset_specs(p, cpu=torch.device(device).type == "cpu", quick=quick)
        if not got:
            entry = op.presets.get(p, f"no such preset for {op.name} (have: {', '.join(op.presets)})")
            skipped[p] = entry if isinstance(entry, str) else "no shapes"
        specs.extend(got)
    specs.extend(custom)
    if torch.device(device).type == "cpu" and not full_size:
        specs = [s if s.cpu_sized or (small := op.scale_for_cpu(s.shape, quick)) == s.shape
                 else replace(s, shape=small, scaled_from=op.describe(s.shape)) for s in specs]
    seen: dict[tuple, ShapeSpec] = {}
    notes = []
    for s in specs:
        first = seen.setdefault((s.shape, s.dtype), s)
        if first is not s:
            notes.append(f"{s.preset}/{s.id}: the same {'CPU ' if s.scaled_from else ''}shape as "
                         f"{first.preset}/{first.id} ({op.describe(s.shape)}), timed once there")
    return list(seen.values()), skipped, notes


def exc_text(exc: BaseException, caught: list, limit: int = 1500) -> str:
    """An exception as one line, followed by the distinct warnings recorded with it."""
    text = str(exc) if isinstance(exc, Exception) and type(exc).__name__ == "Skip" else f"{type(exc).__name__}: {exc}"
    msgs = list(dict.fromkeys(short_text(str(w.message), 300) for w in caught))
    return short_text(text + (" | warnings: " + " / ".join(msgs[:4]) if msgs else ""), limit)


def cuda_alive(device) -> bool:
    """False once a CUDA error has left the context unusable."""
    import torch

    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:
        return False


def run(op: OpBench, specs: list[ShapeSpec], cfg: RunConfig, *, done: dict[str, dict] | None = None,
        died_in: str | None = None, on_row: Callable[[dict, str], None] | None = None,
        ) -> tuple[list[dict], dict[str, str], str | None]:
    """(rows, {backend: why not timed here}, the fatal error or None). ``done``: rows of an
    earlier run by key (resume); ``died_in``: the key that run was in when it ended;
    ``on_row(row, event)``: called with "start" before a case runs and "done" after each row."""
    import torch

    device, done = cfg.device, done or {}
    backends = op.backends()
    not_timed = {n: why for n in cfg.backends if (why := backends[n].why_not(device))}
    usable = [n for n in cfg.backends if n not in not_timed]
    rows: list[dict] = []
    fatal: str | None = None
    t_start = time.perf_counter()
    for i, spec in enumerate(specs):
        dtype_name = cfg.dtype or spec.dtype or ("bfloat16" if device.type == "cuda" else "float32")
        dtype = getattr(torch, dtype_name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        sets, ref, inputs_failed = None, None, None
        for mode in cfg.modes:
            for name in usable:
                key = case_key(op.name, spec, dtype_name, mode, name)
                row = {"key": key, "op": op.name, "preset": spec.preset, "case": spec.id, "label": spec.label,
                       "shape": op.describe(spec.shape), "params": op.params(spec.shape),
                       "scaled_from": spec.scaled_from, "x": op.x(spec.shape), "dtype": dtype_name, "mode": mode,
                       "backend": name, "flops": op.flops(spec.shape, mode),
                       "bytes": op.bytes(spec.shape, itemsize, mode), "status": "not_run", "reason": None}
                rows.append(row)
                if done.get(key, {}).get("status") in ("ok", "skipped"):
                    row.update(done[key])
                elif key == died_in:
                    row.update(status="skipped", reason="the previous run died or hung in this case; not retried")
                elif fatal:
                    row["reason"] = f"not run: {fatal}"
                elif cfg.budget_s and time.perf_counter() - t_start > cfg.budget_s:
                    row["reason"] = f"not run: the time budget of {cfg.budget_s:g} s was used up"
                else:
                    if on_row:
                        on_row(row, "start")
                    if sets is None:
                        sets, ref = _inputs(op, spec, dtype, cfg, i, row)
                        inputs_failed = None if sets else row["reason"]
                    if sets:
                        _run_one(op, backends[name], spec, sets, ref, dtype_name, mode, cfg, row)
                    elif inputs_failed:  # every backend of this shape: the same reason, not a bare "not run"
                        row.update(status="skipped", reason=inputs_failed)
                    if row["status"] != "ok" and not cuda_alive(device):
                        fatal = f"the CUDA context is unusable after {key}: {short_text(row['reason'], 600)}"
                if on_row:
                    on_row(row, "done")
        if sets and device.type == "cuda":
            del sets, ref
            gc.collect()
            torch.cuda.empty_cache()
    add_derived(rows, op, cfg.ceilings)
    return rows, not_timed, fatal


def _inputs(op, spec, dtype, cfg, i, row):
    """(input sets, (reference output, reference grads)); ([], None) with the row skipped on failure."""
    import torch

    try:
        g = torch.Generator(device=cfg.device).manual_seed(cfg.seed * 1_000_003 + i)
        sets = [op.make_inputs(spec.shape, dtype, cfg.device, g)]
        n = timing.rotation_count(_nbytes(sets[0]), cfg.device) if cfg.rotate else 1
        sets += [op.make_inputs(spec.shape, dtype, cfg.device, g) for _ in range(n - 1)]
        return sets, op.reference(spec.shape, sets[0], grad=any(m != "fwd" for m in cfg.modes))
    except Exception as exc:
        row.update(status="skipped", reason=f"inputs/reference failed: {type(exc).__name__}: {short_text(exc, 600)}")
        return [], None


def _nbytes(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if hasattr(t, "element_size"))


def _run_one(op, backend, spec, sets, ref, dtype_name, mode, cfg, row) -> None:
    import torch

    device, grad = cfg.device, mode != "fwd"
    if grad and backend.fwd_only:
        row.update(status="skipped", reason=backend.fwd_only)
        return
    guard = op.memory_guard(backend, spec.shape, torch.empty((), dtype=getattr(torch, dtype_name)).element_size(),
                            mode, device)
    if guard:
        row.update(status="skipped", reason=guard)
        return
    caught: list = []
    leaves: list = []
    if cfg.case_timeout_s:
        faulthandler.dump_traceback_later(cfg.case_timeout_s, exit=True)
    try:
        with backend.context(), warnings.catch_warnings(record=True) as caught:
            # the first call's warnings are kept (SDPA explains a refusal only through them);
            # then they are ignored, so a per-call warning costs no time
            warnings.simplefilter("always")
            bounds = [op.bind(backend, spec.shape, inp, grad) for inp in sets]
            leaves = [t for b in bounds for t in b.leaves.values()]
            t0 = time.perf_counter()
            out = bounds[0].fn()
            if grad:
                out.backward(bounds[0].dout, retain_graph=(mode == "bwd"))
            timing.sync(device)
            row["first_call_s"] = round(time.perf_counter() - t0, 4)
            warnings.simplefilter("ignore")
            b0 = bounds[0]
            grads = {n: None if t.grad is None else b0.canonical(t.grad) for n, t in b0.leaves.items()}
            tol = {} if backend.out_rtol is None else {"tol": backend.out_rtol}
            row["check"] = op.check(b0.canonical(out.detach()), grads, ref[0], ref[1], dtype_name, **tol)
            if mode == "fwd":
                fns = [b.fn for b in bounds]
            elif mode == "fwd+bwd":
                fns = [(lambda b=b: b.fn().backward(b.dout)) for b in bounds]
            else:  # bwd alone: one forward per input set, its graph kept, the backward timed
                outs = [out] + [b.fn() for b in bounds[1:]]
                fns = [(lambda b=b, o=o: o.backward(b.dout, retain_graph=True)) for b, o in zip(bounds, outs)]
            fn = timing.cycle(fns)
            t = (cfg.timer or timing.time_fn)(fn, device, grads=leaves, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms,
                                              min_reps=cfg.min_reps)
            row.update(ms_p50=t.ms_p50, ms_p20=t.ms_p20, ms_p80=t.ms_p80, timer=t.timer, reps=t.reps,
                       rotation_sets=len(sets), status="ok")
            if device.type == "cuda":
                timing.reset_grads(leaves)
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                fn()
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device)
                row.update(peak_mem_mib=round(peak / MIB, 1), extra_mem_mib=round((peak - before) / MIB, 1))
            if caught:
                row["warnings"] = list(dict.fromkeys(short_text(str(w.message), 200) for w in caught))[:4]
    except Exception as exc:
        row.update(status="skipped", reason=exc_text(exc, caught))
        if cfg.verbose:
            traceback.print_exc()
    finally:
        if cfg.case_timeout_s:
            faulthandler.cancel_dump_traceback_later()
        timing.reset_grads(leaves)
        if row["status"] != "ok" and device.type == "cuda":
            gc.collect()
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()


def add_derived(rows: list[dict], op: OpBench, ceilings: dict | None) -> None:
    """TFLOP/s or GB/s, % of the measured ceiling, speedup vs the eager baseline."""
    base = {(r["preset"], r["case"], r["dtype"], r["mode"]): r["ms_p50"] for r in rows
            if r["status"] == "ok" and r["backend"] == op.baseline}
    c = ceilings or {}
    for r in rows:
        if r["status"] != "ok":
            continue
        s = r["ms_p50"] * 1e-3
        r["tflops"] = r["flops"] / s / 1e12 if r.get("flops") and s > 0 else None
        r["gbps"] = r["bytes"] / s / 1e9 if r.get("bytes") and s > 0 else None
        # against the matmul ceiling of the same precision class only (bf16 ~ fp16)
        same = c.get("matmul_dtype") == r["dtype"] or {c.get("matmul_dtype"), r["dtype"]} <= {"bfloat16", "float16"}
        r["pct_of_ceiling"] = (percent_of(r["gbps"], c.get("copy_gbps")) if op.metric == "gbps" else
                               percent_of(r["tflops"], c.get("matmul_tflops")) if same else None)
        ref = base.get((r["preset"], r["case"], r["dtype"], r["mode"]))
        r["speedup_vs_eager"] = ref / r["ms_p50"] if ref and r["ms_p50"] > 0 else None
