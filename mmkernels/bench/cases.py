"""The case registry: what ``cases_<op>.py`` defines (``BENCH``, an :class:`OpBench`), and how it is
found (:func:`op_names` without importing, so ``--help`` stays instant; :func:`load`). The runner,
CLI, reports and suite know nothing else about an op; the package docstring says how to add one."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DTYPE_ALIASES", "Backend", "Bound", "MODEL_PRESETS", "OP_ALIASES", "OpBench", "OpUnavailable", "ShapeSpec",
           "Skip", "dtype_arg", "dtype_name", "load", "mk_unavailable", "op_names", "parse_kv"]

#: relative (Frobenius) error bounds against float64: ~3x what plain PyTorch gets in the dtype
#: (eager bf16 attention measured near 5e-3 at L = 64); gradients get 2.5x more room
OUT_RTOL = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 2e-3, "float64": 1e-10}
GRAD_RTOL_FACTOR = 2.5
MODEL_PRESETS = ("blip2", "instructblip", "llava15", "llava-ov", "gemma3", "qwen2vl", "qwen25vl", "internvl")
#: other names ``mmkernels bench`` accepts for an op (the op's own name is its ``cases_<op>.py``):
#: ``qformer``, the Q-Former cross-attention op's name before it took the public function's
OP_ALIASES = {"qformer": "qformer_cross_attention"}


#: every spelling ``mmkernels bench --dtype`` and ``mmkernels inspect --dtype`` accept -> torch's name
DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                 "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}
DTYPE_SPELLINGS = "bf16/bfloat16, fp16/float16/half, fp32/float32/float"


def dtype_name(text: str) -> str:
    """torch's name of a dtype spelled any way the commands accept (``bf16``, ``torch.bfloat16``,
    ``half`` ...); ValueError naming the spellings otherwise."""
    key = str(text).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {text!r} (expected {DTYPE_SPELLINGS})")
    return DTYPE_ALIASES[key]


def dtype_arg(text: str) -> str:
    """:func:`dtype_name` as an argparse ``type=``: a bad spelling is a usage error (exit 2)."""
    import argparse

    try:
        return dtype_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Skip(Exception):
    """A case that cannot run (raised by ``OpBench.bind`` or a backend); the text is the reason."""


class OpUnavailable(RuntimeError):
    """The op's benchmark cannot run in this build (its public function does not exist yet)."""


@dataclass(frozen=True)
class ShapeSpec:
    """One shape: ``preset``/``id`` in the case key, ``shape`` the op's frozen dataclass, ``dtype`` the
    model's (HF keeps the Q-Former in float32), ``scaled_from`` the real shape a CPU run shrank,
    ``cpu_sized``: a generated shape the CPU scaling leaves alone."""

    preset: str
    id: str
    label: str
    shape: Any
    dtype: str | None = None
    scaled_from: str | None = None
    cpu_sized: bool = False


@dataclass
class Backend:
    """A way of computing an op: ``call`` is the op module's business (usually ``call(shape)`` returns
    the function to time); ``why_not(device)``: why it cannot run here at all (None: it can);
    ``context()`` is entered around its calls (SDPA pinning, ``mmkernels.use_backend``)."""

    name: str
    description: str
    call: Any = None
    why_not: Callable[[Any], str | None] = lambda device: None
    context: Callable[[], Any] = contextlib.nullcontext
    gpu_kernel: bool = False
    layout: str = "bhld"  # attention: "blhd" when it takes (B, L, H, D) tensors
    score_bytes: int | None = None  # attention: bytes per element of the L×L scores it holds
    #: on a CPU, why it is not in the default set (slow to build: torch.compile); it runs when named
    cpu_opt_in: str | None = None
    #: forward only (fp8, returned scores): why its fwd+bwd / bwd cases are skipped (None: it has a backward)
    fwd_only: str | None = None
    #: its own relative-error bound of the output check (None: the dtype's ``OUT_RTOL``): fp8's
    #: error is large by design (docs/fp8.md)
    out_rtol: float | None = None


@dataclass
class Bound:
    """A backend bound to one input set: ``fn()`` runs the op; ``leaves`` (name -> tensor) get grads;
    ``dout``: the backward's gradient; ``canonical(t)``: an output or grad in the op's layout."""

    fn: Callable[[], Any]
    leaves: dict = field(default_factory=dict)
    dout: Any = None
    canonical: Callable[[Any], Any] = lambda t: t


def mk_unavailable(op: str, name: str, device) -> str | None:
    """Why mmkernels' ``name`` backend of dispatcher op ``op`` cannot run on ``device`` (None: it can)."""
    import torch

    from .. import dispatch
    from .._utils import interpreting, triton_import_error

    have = {b.name: b for b in dispatch.backends(op)}
    if name == "cuda" and not torch.version.cuda:  # no build switch helps: say so, suggest none
        return "this torch is a CPU-only build: the CUDA extension needs torch with CUDA"
    if name not in have:
        return f"mmkernels.{op} has no {name!r} backend in this build (it has: {', '.join(have) or 'none'})"
    reasons = [getattr(r, "text", str(r)) for r in have[name].available()]
    if name == "triton":
        reasons.append(triton_import_error() or "")
        if getattr(device, "type", device) == "cpu" and not interpreting():
            reasons.append("CPU tensors run Triton kernels only with TRITON_INTERPRET=1 (and then only for tests)")
    if name == "cuda" and getattr(device, "type", device) != "cuda":
        reasons.append("the CUDA extension runs on CUDA tensors only")
    return "; ".join(r for r in reasons if r) or None


def mk_backend(op: str, name: str, call, description: str) -> Backend:
    """An mmkernels backend, forced with ``mmkernels.use_backend``: a case it cannot run raises the
    dispatcher's reasons instead of silently falling back."""

    def context():
        import mmkernels

        return mmkernels.use_backend(name)

    return Backend(name, description, call, lambda device: mk_unavailable(op, name, device), context, gpu_kernel=True)


def parse_kv(text: str, types: dict[str, Callable[[str], Any]], aliases: dict[str, str] | None = None) -> dict:
    """``"B=16,H=16,L=577,d=64"`` -> ``{"B": 16, ...}`` with each key's type; unknown keys raise."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, eq, v = (s.strip() for s in part.partition("="))
        k = (aliases or {}).get(k, k)
        if not eq or k not in types:
            raise ValueError(f"--shape {text!r}: {part!r} is not key=value with a key of {', '.join(types)}")
        try:
            out[k] = types[k](v)
        except ValueError as exc:
            raise ValueError(f"--shape {text!r}: bad value for {k}: {v!r} ({exc})") from None
    return out


def short_text(text: str, n: int) -> str:
    """One line of at most ``n`` characters (whitespace folded, "..." where cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def as_bool(v: str) -> bool:
    if v.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError("expected 0/1")
    return v.lower() in ("1", "true", "yes", "on")


def rel_error(got, ref) -> tuple[float, float]:
    """(max abs error, relative Frobenius error) of ``got`` against the float64 ``ref``."""
    diff = (got.double() - ref).abs()
    den = ref.norm().item()
    return diff.max().item(), diff.norm().item() / (den if den > 0 else 1.0)


class OpBench:
    """Base of every ``cases_<op>.BENCH``; a subclass fills in the op-specific parts."""

    name = ""  # the CLI name (`mmkernels bench <name>`) and the suite's file (test_bench_<name>.py)
    title = ""
    api: str | None = None  # attribute of `mmkernels` the benchmark needs (absent: the op is skipped)
    metric = "tflops"  # "tflops" (compute-bound) or "gbps" (memory-bound): the throughput column
    convention = ""  # the FLOP or byte model, stated in every results file
    presets: dict[str, list[ShapeSpec] | str] = {}  # preset -> shapes, or why the model has none
    extra_presets: tuple[str, ...] = ()  # run by `--preset all` besides the model presets
    baseline = "eager"  # what speedups are against
    default_modes: tuple[str, ...] = ("fwd",)
    opt_in: dict[str, str] = {}  # backends left out of the default set: name -> what it is
    #: the pytest-benchmark suite: CPU backends at CPU-scaled sizes on the CPU, real sizes on CUDA
    suite_backends = {"cpu": ("eager", "sdpa"), "cuda": ("eager", "sdpa", "triton")}
    suite_modes = {"cpu": ("fwd",), "cuda": ("fwd", "fwd+bwd")}
    #: the inputs whose gradients the float64 check compares (their batch-0 slice)
    grad_checked: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        import mmkernels

        if self.api and not hasattr(mmkernels, self.api):
            return f"mmkernels.{self.api} does not exist in this build yet"
        return None

    def model_presets(self) -> list[str]:
        return [p for p in MODEL_PRESETS if p in self.presets] + list(self.extra_presets)

    def preset_specs(self, preset: str, *, cpu: bool, quick: bool) -> list[ShapeSpec]:
        entry = self.presets.get(preset)
        return list(entry) if isinstance(entry, list) else []

    def params(self, shape) -> dict:
        return asdict(shape)

    # what a cases module defines (the package docstring lists them): backends, parse_shape, describe,
    # x, make_inputs, bind, reference; and where the default does not fit, these
    def scale_for_cpu(self, shape, quick: bool):
        """A smaller shape of the same structure (head dims, grids kept) for a CPU run."""
        return shape

    def ref_slice(self, t):
        """The part of an output or input gradient that ``reference`` covers (default: batch 0)."""
        return t[0]

    def memory_guard(self, backend: Backend, shape, itemsize: int, mode: str, device) -> str | None:
        """A skip reason when the case would obviously not fit in memory (None: try it)."""
        return None

    def flops(self, shape, mode: str) -> float | None:
        return None

    def bytes(self, shape, itemsize: int, mode: str) -> float | None:
        return None

    def summary_notes(self, rows: list[dict]) -> list[str]:
        return []

    # ---- the check ---------------------------------------------------------------------
    def check(self, out, grads: dict, ref, ref_grads: dict, dtype: str, tol: float | None = None) -> dict:
        """The first call's canonical output (and gradients) against the float64 reference; ``tol``:
        the backend's own bound (``Backend.out_rtol``), recorded in the row, instead of the dtype's."""
        import torch

        got = self.ref_slice(out)
        c = {"finite": bool(torch.isfinite(got).all())}
        if tol is not None:
            c["tol"] = tol
        tol = OUT_RTOL.get(dtype, 2e-2) if tol is None else tol
        c["max_abs_err"], c["rel_err"] = rel_error(got, ref)
        ok = c["finite"] and c["rel_err"] <= tol
        for name, g in grads.items():
            if g is None:
                c[f"d{name}_rel_err"], ok = None, False
                continue
            c["finite"] = c["finite"] and bool(torch.isfinite(g).all())
            if name in ref_grads:
                c[f"d{name}_rel_err"] = rel_error(self.ref_slice(g), ref_grads[name])[1]
                ok = ok and c[f"d{name}_rel_err"] <= GRAD_RTOL_FACTOR * tol
        c["ok"] = bool(ok and c["finite"])
        return c


def op_names() -> list[str]:
    """Every ``cases_<op>.py`` here, without importing any (attention first)."""
    from . import __path__ as pkg_path

    names = [m.name[len("cases_"):] for m in pkgutil.iter_modules(pkg_path) if m.name.startswith("cases_")]
    return sorted(names, key=lambda n: (n != "attention", n))


def load(op: str) -> OpBench:
    """The ``BENCH`` of ``cases_<op>.py`` (``op`` may be one of :data:`OP_ALIASES`); :class:`OpUnavailable`
    when it cannot run in this build."""
    op = OP_ALIASES.get(op, op)
    try:
        bench: OpBench = importlib.import_module(f"{__package__}.cases_{op}").BENCH
    except Exception as exc:
        raise OpUnavailable(f"cannot import mmkernels.bench.cases_{op}: {type(exc).__name__}: {exc}") from exc
    why = bench.unavailable()
    if why:
        raise OpUnavailable(why)
    return bench
