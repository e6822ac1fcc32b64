"""Runs an op's benchmark cases: plan, inputs, correctness check, timing, memory, derived columns.

One row per (shape, dtype, mode, backend). Every failure of a case — an unsupported combination,
an out-of-memory, a compile error — becomes ``status: "skipped"`` with the exception text (and
the warnings that explain it: SDPA says why it refuses only through warnings); the run goes on.
A CUDA error that poisons the context stops the run (every later case would fail for it).
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import timing
from .ceilings import percent_of
from .flops import MODES
from .registry import OpBench, ShapeSpec
from .report import short_text

__all__ = ["RunConfig", "case_key", "plan", "run", "setup_case"]

MIB = 1 << 20


@dataclass
class RunConfig:
    device: Any
    modes: list[str] = field(default_factory=lambda: ["fwd"])
    backends: list[str] = field(default_factory=list)
    dtype: str | None = None  # None: each shape's own dtype, else the device default
    quick: bool = False
    warmup_ms: float | None = None
    rep_ms: float | None = None
    min_reps: int = 5
    seed: int = 0
    rotate: bool = True
    ceilings: dict | None = None
    verbose: bool = False
    #: start no case after this many seconds of the run (None: no limit); the rest is "not run"
    budget_s: float | None = None

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

    def default_dtype(self) -> str:
        return "bfloat16" if self.device.type == "cuda" else "float32"


def case_key(op: str, spec: ShapeSpec, dtype: str, mode: str, backend: str) -> str:
    """Stable identity of a case across runs: what ``mmkernels bench compare`` matches on."""
    return f"{op}/{spec.preset}/{spec.id}/{dtype}/{mode}/{backend}"


def plan(op: OpBench, presets: list[str], custom: list[ShapeSpec], device, *, quick: bool,
         full_size: bool = False) -> tuple[list[ShapeSpec], dict[str, str]]:
    """(shape specs to run, {preset: why it has none}) — on the CPU shrunk unless ``full_size``."""
    import torch

    cpu = torch.device(device).type == "cpu"
    specs: list[ShapeSpec] = []
    skipped: dict[str, str] = {}
    for p in presets:
        if p not in op.presets:
            skipped[p] = f"no such preset for {op.name} (have: {', '.join(op.presets)})"
            continue
        got = op.preset_specs(p, cpu=cpu, quick=quick)
        if not got:
            entry = op.presets[p]
            skipped[p] = entry if isinstance(entry, str) else "no shapes"
            continue
        specs.extend(got)
    specs.extend(custom)
    if cpu and not full_size:
        scaled = []
        for s in specs:
            small = s.shape if s.cpu_sized else op.scale_for_cpu(s.shape, quick)
            scaled.append(s if small == s.shape else
                          replace(s, shape=small, scaled_from=op.describe(s.shape)))
        specs = scaled
    return specs, skipped


# --------------------------------------------------------------------------------------
# one case
# --------------------------------------------------------------------------------------
def warning_messages(caught: list, n: int) -> list[str]:
    """The distinct messages of recorded warnings, each cut to ``n`` characters, in order."""
    msgs: list[str] = []
    for w in caught:
        m = short_text(str(w.message), n)
        if m not in msgs:
            msgs.append(m)
    return msgs


def exc_text(exc: BaseException, caught: list, *, per_warning: int = 300, max_warnings: int = 4,
             limit: int = 1500) -> str:
    """An exception as one line, followed by the warnings recorded with it (SDPA explains a
    refusal such as "No available kernel" only through warnings)."""
    text = f"{type(exc).__name__}: {exc}" if type(exc).__name__ != "Skip" else str(exc)
    msgs = warning_messages(caught, per_warning)
    if msgs:
        text += " | warnings: " + " / ".join(msgs[:max_warnings])
    return short_text(text, limit)


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


@dataclass
class CaseRun:
    """A case made ready to time: ``fn`` (rotating over the input sets), the tensors whose grads
    are reset before each call, the correctness check of the first call."""

    fn: Callable[[], Any]
    grads: list
    check: dict
    first_call_s: float
    sets: int


def setup_case(op: OpBench, backend, spec: ShapeSpec, input_sets: list[dict], ref, dtype: str, mode: str,
               device) -> CaseRun:
    """Bind ``backend`` to every input set, make the first (untimed: compilation, autotuning)
    call and check its output; raises on any failure (the caller records the skip)."""
    grad = mode != "fwd"
    bounds = [op.bind(backend, spec.shape, inp, device, grad) for inp in input_sets]
    t0 = time.perf_counter()
    out = bounds[0].fn()
    if grad:
        out.backward(bounds[0].dout, retain_graph=(mode == "bwd"))
    timing.sync(device)
    first = time.perf_counter() - t0
    check = op.check(spec.shape, bounds[0].to_canonical(out.detach()), ref, dtype)
    if grad:
        import torch

        check["grads_finite"] = all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in bounds[0].leaves)
        check["ok"] = check["ok"] and check["grads_finite"]
    grads = [t for b in bounds for t in b.leaves]
    if mode == "fwd":
        fns = [b.fn for b in bounds]
    elif mode == "fwd+bwd":
        fns = [(lambda b=b: b.fn().backward(b.dout)) for b in bounds]
    else:  # bwd alone: one forward per input set, its graph kept, backward timed
        outs = [out] + [b.fn() for b in bounds[1:]]
        fns = [(lambda b=b, o=o: o.backward(b.dout, retain_graph=True)) for b, o in zip(bounds, outs, strict=True)]
    return CaseRun(timing.cycle(fns), grads, check, first, len(bounds))


def peak_memory(fn, grads, device) -> tuple[float, float]:
    """(peak, extra over what was allocated before) MiB of one call of ``fn`` on CUDA."""
    import torch

    timing.reset_grads(grads)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    r = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del r
    return round(peak / MIB, 1), round((peak - before) / MIB, 1)


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
def run(op: OpBench, specs: list[ShapeSpec], cfg: RunConfig,
        progress: Callable[[int, int, dict], None] | None = None) -> tuple[list[dict], dict[str, str], list[str]]:
    """(rows, {backend: why not timed here}, notes)."""
    import torch

    device = cfg.device
    backends = op.make_backends()
    unknown = [b for b in cfg.backends if b not in backends]
    if unknown:
        raise ValueError(f"--backends: unknown {unknown} for {op.name} (have: {', '.join(backends)})")
    not_timed: dict[str, str] = {}
    usable: list[str] = []
    for name in cfg.backends:
        why = backends[name].unavailable(device)
        if why:
            not_timed[name] = why
        else:
            usable.append(name)
    notes: list[str] = []
    rows: list[dict] = []
    total = len(specs) * len(cfg.modes) * len(usable)
    done = 0
    fatal: str | None = None
    t_start = time.perf_counter()
    for i, spec in enumerate(specs):
        dtype_name = cfg.dtype or spec.dtype or cfg.default_dtype()
        dtype = getattr(torch, dtype_name)
        itemsize = torch.empty((), dtype=dtype).element_size()
        input_sets: list[dict] = []
        ref = None
        setup_error = None
        try:
            g = torch.Generator(device=device)
            g.manual_seed(cfg.seed * 1_000_003 + i)
            input_sets = [op.make_inputs(spec.shape, dtype, device, g)]
            n_sets = timing.rotation_count(op.input_bytes(input_sets[0]), device) if cfg.rotate else 1
            input_sets += [op.make_inputs(spec.shape, dtype, device, g) for _ in range(n_sets - 1)]
            ref = op.reference(spec.shape, input_sets[0])
        except Exception as exc:
            setup_error = f"inputs/reference failed: {type(exc).__name__}: {short_text(str(exc), 600)}"
        for mode in cfg.modes:
            for name in usable:
                backend = backends[name]
                row: dict[str, Any] = {
                    "key": case_key(op.name, spec, dtype_name, mode, name),
                    "op": op.name, "preset": spec.preset, "case": spec.id, "label": spec.label,
                    "shape": op.describe(spec.shape), "params": op.params(spec.shape),
                    "scaled_from": spec.scaled_from, "x": op.x(spec.shape), "dtype": dtype_name, "mode": mode,
                    "backend": name, "flops": op.flops(spec.shape, mode), "bytes": op.bytes(spec.shape, itemsize, mode),
                    "status": "skipped", "reason": None,
                }
                rows.append(row)
                done += 1
                if fatal:
                    row["reason"] = f"not run: {fatal}"
                elif setup_error:
                    row["reason"] = setup_error
                elif cfg.budget_s and time.perf_counter() - t_start > cfg.budget_s:
                    row["reason"] = f"not run: the time budget of {cfg.budget_s:g} s was used up"
                else:
                    _run_one(op, backend, spec, input_sets, ref, dtype_name, mode, cfg, row)
                    if row["status"] != "ok" and not cuda_alive(device):
                        fatal = f"the CUDA context is unusable after {row['key']}"
                        notes.append(f"FATAL: {fatal}: {row['reason']}")
                if progress:
                    progress(done, total, row)
        input_sets = []
        ref = None
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    add_derived(rows, op, cfg.ceilings)
    notes.extend(op.summary_notes(rows))
    return rows, not_timed, notes


def _run_one(op, backend, spec, input_sets, ref, dtype_name, mode, cfg, row) -> None:
    import torch

    device = cfg.device
    guard = op.memory_guard(backend, spec.shape, getattr(torch, dtype_name), mode, device)
    if guard:
        row["reason"] = guard
        return
    caught: list = []
    cr = None
    try:
        with backend.context(), warnings.catch_warnings(record=True) as caught:
            # the first call's warnings are kept (SDPA explains a refusal only through them);
            # from the timing on they are ignored so a per-call warning costs no time
            warnings.simplefilter("always")
            cr = setup_case(op, backend, spec, input_sets, ref, dtype_name, mode, device)
            warnings.simplefilter("ignore")
            row["first_call_s"] = round(cr.first_call_s, 4)
            row["check"] = cr.check
            row["rotation_sets"] = cr.sets
            t = timing.time_fn(cr.fn, device, grads=cr.grads, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms,
                               min_reps=cfg.min_reps)
            row.update(ms_p50=t.ms_p50, ms_p20=t.ms_p20, ms_p80=t.ms_p80, timer=t.timer, reps=t.reps)
            if device.type == "cuda":
                row["peak_mem_mib"], row["extra_mem_mib"] = peak_memory(cr.fn, cr.grads, device)
            row["status"] = "ok"
            ws = warning_messages(caught, 200)
            if ws:
                row["warnings"] = ws[:4]
    except Exception as exc:
        row["status"] = "skipped"
        row["reason"] = exc_text(exc, caught)
        if cfg.verbose:
            traceback.print_exc()
    finally:
        if cr is not None:
            for t_ in cr.grads:
                t_.grad = None
        cr = None
        if row["status"] != "ok" and device.type == "cuda":
            gc.collect()
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()


def add_derived(rows: list[dict], op: OpBench, ceilings: dict | None) -> None:
    """TFLOP/s or GB/s, % of the measured ceiling, speedup vs the eager baseline."""
    base = {}
    for r in rows:
        if r["status"] == "ok" and r["backend"] == op.baseline:
            base[(r["preset"], r["case"], r["dtype"], r["mode"])] = r["ms_p50"]
    c = ceilings or {}
    for r in rows:
        if r["status"] != "ok":
            continue
        s = r["ms_p50"] * 1e-3
        r["tflops"] = r["flops"] / s / 1e12 if r.get("flops") and s > 0 else None
        r["gbps"] = r["bytes"] / s / 1e9 if r.get("bytes") and s > 0 else None
        if op.metric == "gbps":
            r["pct_of_ceiling"] = percent_of(r["gbps"], c.get("copy_gbps"))
        else:
            # compare with the matmul ceiling of the same precision class only (bf16 ~ fp16)
            cd = c.get("matmul_dtype")
            same = cd == r["dtype"] or {cd, r["dtype"]} <= {"bfloat16", "float16"}
            r["pct_of_ceiling"] = percent_of(r["tflops"], c.get("matmul_tflops")) if same else None
        ref = base.get((r["preset"], r["case"], r["dtype"], r["mode"]))
        r["speedup_vs_eager"] = ref / r["ms_p50"] if ref and r["ms_p50"] > 0 else None
