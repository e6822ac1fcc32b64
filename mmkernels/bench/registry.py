"""How an op's benchmark plugs in: one module ``mmkernels/bench/cases_<op>.py`` defining ``BENCH``.

``BENCH`` is an :class:`OpBench`: the op's presets (the real model shapes of DESIGN.md), its
backends, how to build random inputs, how to call each backend on them, a float64 reference
for the correctness check, and its FLOP/byte model. The runner (:mod:`.runner`), the CLI, the
reports and the pytest-benchmark suite know nothing else about the op, so adding an op is
adding one module: :func:`op_names` finds ``cases_*.py`` without importing them (``--help``
stays instant) and :func:`load` imports one when it is asked for.

An op whose public function is not in this build yet (``OpBench.unavailable()`` says why) is
reported as skipped with that reason — by the CLI, the suite and the reports — never a crash.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Bound",
    "BenchBackend",
    "MkBackend",
    "OpBench",
    "OpUnavailable",
    "ShapeSpec",
    "Skip",
    "load",
    "mk_backend_unavailable",
    "op_names",
    "parse_kv",
]

#: relative (Frobenius) error bounds of the output against float64: ~3x what plain PyTorch
#: gets in the dtype (bench_attention.py measured eager bf16 near 5e-3 at L = 64)
OUT_RTOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 2e-3, "float64": 1e-10}
MODEL_PRESETS = ("blip2", "instructblip", "llava15", "llava-ov", "gemma3", "qwen2vl", "internvl")


class Skip(Exception):
    """Raised by ``OpBench.bind`` (or a backend) when a case cannot run; the text is the reason."""


class OpUnavailable(RuntimeError):
    """The op's benchmark cannot run in this build (its public function does not exist yet)."""


@dataclass(frozen=True)
class ShapeSpec:
    """One benchmark shape: ``preset``/``id`` make the stable case key, ``label`` says what it
    is, ``shape`` is the op's own frozen dataclass, ``dtype`` the model's dtype where it is
    not the run's default (HF keeps the Q-Former in float32), ``scaled_from`` the real shape
    when a CPU run shrank it."""

    preset: str
    id: str
    label: str
    shape: Any
    dtype: str | None = None
    scaled_from: str | None = None
    #: already sized for a CPU run (generated sweeps): the CPU scaling leaves it alone
    cpu_sized: bool = False


@dataclass
class Bound:
    """One backend bound to one input set: ``fn()`` runs the op and returns its output;
    ``leaves`` get gradients (empty in fwd mode); ``dout`` is the backward's random gradient
    in the backend's layout; ``to_canonical(out)`` maps the output to the op's canonical layout
    for the correctness check."""

    fn: Callable[[], Any]
    leaves: list = field(default_factory=list)
    dout: Any = None
    to_canonical: Callable[[Any], Any] = lambda o: o


class BenchBackend:
    """A way of computing an op that the benchmark times."""

    name = ""
    description = ""
    #: True for GPU kernels: named in the "not timed here" line of a CPU run
    gpu_kernel = False

    def unavailable(self, device, dtype=None) -> str | None:
        """Why this backend cannot run at all here (None: it can); checked once per run."""
        return None

    def context(self):
        return contextlib.nullcontext()


class MkBackend(BenchBackend):
    """An mmkernels backend of an op (``triton``, ``cuda``), forced with ``mmkernels.use_backend``:
    the call raises with the dispatcher's reasons rather than silently falling back."""

    gpu_kernel = True

    def __init__(self, name: str, dispatch_op: str, description: str = ""):
        self.name, self.dispatch_op = name, dispatch_op
        self.description = description or f"mmkernels.{dispatch_op} with use_backend({name!r})"

    def unavailable(self, device, dtype=None):
        return mk_backend_unavailable(self.dispatch_op, self.name, device)

    def context(self):
        import mmkernels

        return mmkernels.use_backend(self.name)


def mk_backend_unavailable(dispatch_op: str, name: str, device) -> str | None:
    """Why mmkernels' ``name`` backend of ``dispatch_op`` cannot run on ``device`` (None: it can)."""
    from .. import dispatch
    from .._utils import interpreting, triton_import_error

    backends = {b.name: b for b in dispatch.backends(dispatch_op)}
    if name not in backends:
        have = ", ".join(backends) or "none"
        return f"mmkernels.{dispatch_op} has no {name!r} backend in this build (it has: {have})"
    reasons = [getattr(r, "text", str(r)) for r in backends[name].available()]
    if reasons:
        return "; ".join(reasons)
    if name == "triton":
        err = triton_import_error()
        if err:
            return err
        if getattr(device, "type", device) == "cpu" and not interpreting():
            return "CPU tensors run Triton kernels only with TRITON_INTERPRET=1 (and then only for tests)"
    if name == "cuda" and getattr(device, "type", device) != "cuda":
        return "the CUDA extension runs on CUDA tensors only"
    return None


def parse_kv(text: str, types: dict[str, Callable[[str], Any]], aliases: dict[str, str] | None = None) -> dict:
    """``"B=16,H=16,L=577,d=64"`` -> ``{"B": 16, ...}`` with each key's type; unknown keys raise."""
    aliases = aliases or {}
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--shape {text!r}: {part!r} is not key=value")
        k, v = (s.strip() for s in part.split("=", 1))
        k = aliases.get(k, k)
        if k not in types:
            raise ValueError(f"--shape {text!r}: unknown key {k!r} (known: {', '.join(types)})")
        try:
            out[k] = types[k](v)
        except ValueError as exc:
            raise ValueError(f"--shape {text!r}: bad value for {k}: {v!r} ({exc})") from None
    return out


def as_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 0/1")


def rel_error(got, ref) -> tuple[float, float]:
    """(max abs error, relative Frobenius error) of ``got`` against the float64 ``ref``."""
    diff = (got.double() - ref).abs()
    den = ref.norm().item()
    return diff.max().item(), (diff.norm().item() / den if den > 0 else diff.norm().item())


class OpBench:
    """Base of every ``cases_<op>.BENCH``; subclasses fill in the op-specific parts."""

    #: the CLI name (``mmkernels bench <name>``) and the suite's file (``test_bench_<name>.py``)
    name = ""
    title = ""
    #: attribute of the ``mmkernels`` package the op's benchmark needs (None: always present)
    api: str | None = None
    #: the dispatcher's name of the op (for forcing mmkernels backends)
    dispatch_op = ""
    #: "tflops" (compute-bound ops) or "gbps" (memory-bound ops): the report's throughput column
    metric = "tflops"
    convention = ""
    #: preset -> shapes, or -> the reason this model has no such op (shown as a skip)
    presets: dict[str, list[ShapeSpec] | str] = {}
    #: the eager baseline that speedups are against
    baseline = "eager"
    #: what the pytest-benchmark suite (benchmarks/test_bench_<op>.py) runs: on the CPU a smoke
    #: test of the CPU backends at CPU-scaled sizes, on CUDA the real sizes
    suite_backends = {"cpu": ("eager", "sdpa"), "cuda": ("eager", "sdpa", "triton")}
    suite_modes = {"cpu": ("fwd",), "cuda": ("fwd", "fwd+bwd")}
    #: what ``mmkernels bench <op>`` times without ``--mode``
    default_modes: tuple[str, ...] = ("fwd",)

    # ---- availability ------------------------------------------------------------------
    def unavailable(self) -> str | None:
        """Why this op's benchmark cannot run in this build (None: it can)."""
        if self.api is None:
            return None
        try:
            import mmkernels
        except Exception as exc:  # pragma: no cover - broken install
            return f"import mmkernels failed: {exc!r}"
        if not hasattr(mmkernels, self.api):
            return f"mmkernels.{self.api} does not exist in this build yet"
        return None

    # ---- shapes ------------------------------------------------------------------------
    def model_presets(self) -> list[str]:
        return [p for p in MODEL_PRESETS if p in self.presets]

    def preset_specs(self, preset: str, *, cpu: bool, quick: bool) -> list[ShapeSpec]:
        """The shapes of ``preset`` (before CPU scaling); [] when the model has none."""
        entry = self.presets.get(preset)
        return list(entry) if isinstance(entry, list) else []

    def parse_shape(self, text: str) -> ShapeSpec:
        raise NotImplementedError

    def scale_for_cpu(self, shape, quick: bool):
        """A smaller shape of the same structure for CPU runs (head dims and grids kept)."""
        return shape

    def describe(self, shape) -> str:
        raise NotImplementedError

    def params(self, shape) -> dict:
        from dataclasses import asdict

        return asdict(shape)

    def x(self, shape) -> int:
        """The plots' x axis: the sequence length (tokens) of the case."""
        raise NotImplementedError

    # ---- backends ----------------------------------------------------------------------
    def make_backends(self) -> dict[str, BenchBackend]:
        raise NotImplementedError

    def default_backends(self, device) -> tuple[list[str], dict[str, str]]:
        """(backends to run by default, {backend left out: why}) for ``device``."""
        return list(self.make_backends()), {}

    # ---- inputs, calls, checks ---------------------------------------------------------
    def make_inputs(self, shape, dtype, device, generator) -> dict:
        """Random inputs (never zeros) in the canonical layout, plus ``dout`` for backward."""
        raise NotImplementedError

    def input_bytes(self, inputs: dict) -> int:
        import torch

        return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))

    def bind(self, backend: BenchBackend, shape, inputs: dict, device, grad: bool) -> Bound:
        raise NotImplementedError

    def reference(self, shape, inputs: dict):
        """float64 ground truth of (a slice of) the output."""
        raise NotImplementedError

    def check(self, shape, out, ref, dtype: str) -> dict:
        """Compares the canonical output (or its slice) with :meth:`reference`."""
        import torch

        got = self.ref_slice(out)
        finite = bool(torch.isfinite(got).all().item())
        max_abs, rel = rel_error(got, ref)
        ok = finite and rel <= OUT_RTOL.get(dtype, 2e-2)
        return {"finite": finite, "max_abs_err": max_abs, "rel_err": rel, "ok": bool(ok)}

    def ref_slice(self, out):
        """The part of the output the reference covers (default: batch 0)."""
        return out[0]

    def memory_guard(self, backend: BenchBackend, shape, dtype, mode: str, device) -> str | None:
        """A skip reason when the case would obviously not fit in memory (None: try it)."""
        return None

    # ---- models ------------------------------------------------------------------------
    def flops(self, shape, mode: str) -> float | None:
        return None

    def bytes(self, shape, itemsize: int, mode: str) -> float | None:
        return None

    def summary_notes(self, rows: list[dict]) -> list[str]:
        """Lines for the report's notes drawn from the finished rows (e.g. which backend won)."""
        return []


# --------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------
def op_names() -> list[str]:
    """Every ``cases_<op>.py`` in this package, without importing any (attention first)."""
    from . import __path__ as pkg_path

    names = sorted(m.name[len("cases_"):] for m in pkgutil.iter_modules(pkg_path) if m.name.startswith("cases_"))
    return sorted(names, key=lambda n: (n != "attention", n))


def load(op: str) -> OpBench:
    """The ``BENCH`` of ``cases_<op>.py``; raises :class:`OpUnavailable` with the reason when the
    module cannot be imported or the op is not in this build."""
    try:
        mod = importlib.import_module(f"{__package__}.cases_{op}")
    except Exception as exc:
        raise OpUnavailable(f"cannot import mmkernels.bench.cases_{op}: {type(exc).__name__}: {exc}") from exc
    bench: OpBench = mod.BENCH
    why = bench.unavailable()
    if why:
        raise OpUnavailable(why)
    return bench


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def isqrt_exact(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r * r == n else None
