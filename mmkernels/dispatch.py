"""Backend selection with explained rejections.

Every op keeps an ordered list of :class:`Backend` objects.  A backend declares what it
supports and answers :meth:`Backend.not_supported_reasons` for a concrete call.  In auto
mode the first backend with no reasons runs; the reasons of the backends that were
skipped are emitted as warnings, each distinct one once per process (reasons that only say
"this device/platform is not mine", e.g. a CPU tensor for a GPU kernel, are silent: they
are the expected route, not a surprise).  When the user forces a backend
(``MMKERNELS_BACKEND=triton``, ``with mmkernels.use_backend("triton"):`` or ``backend=``
on a module) an unsupported call raises :class:`BackendNotSupportedError` listing why.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

__all__ = [
    "AUTO",
    "Backend",
    "BackendNotSupportedError",
    "Explanation",
    "Reason",
    "backends",
    "explain",
    "forced_backend",
    "record",
    "register",
    "select",
    "use_backend",
]

AUTO = "auto"
KNOWN_BACKENDS = ("triton", "cuda", "sdpa", "reference")

# A plain list (innermost last) rather than a ContextVar: torch.compile (dynamo) traces
# reads of module globals but graph-breaks on ContextVar.get().
_forced: list[str] = []
_registry: dict[str, list["Backend"]] = {}
_warned: set[str] = set()
_recorders: list[tuple[list, bool]] = []  # active ``record()`` blocks (calls, with_inputs), innermost last
_explaining: list[str] = []  # the op an ``explain()`` call is waiting for


class BackendNotSupportedError(RuntimeError):
    """Raised when a forced backend cannot run a call, or when no backend can."""


@dataclass(frozen=True)
class Reason:
    """Why a backend cannot run a call.

    ``expected`` marks routing reasons (wrong device kind, interpreter not enabled, package
    not installed): falling back for them is the normal path and is not warned about.
    """

    text: str
    expected: bool = False

    def __str__(self) -> str:
        return self.text


@dataclass
class Backend:
    """One implementation of one op.

    ``check(inputs) -> list[Reason | str]`` returns why the call is unsupported (empty: it
    is supported); ``run(**inputs)`` executes it.  ``inputs`` is the op's typed record (a
    ``TypedDict``, ``Inputs`` in the op's module), built once per call.  ``available()`` returns
    reasons that hold for every call (missing package, missing extension) and is what
    ``mmkernels info`` shows.  When any reason is a routing one (``Reason.expected``: the call is
    on a device the backend does not serve), those are the whole answer: the rest of what the
    backend could not do is beside the point, and warning about it would be noise.
    """

    name: str
    op: str
    check: Callable[[dict[str, Any]], list]
    run: Callable[..., Any]
    available: Callable[[], list] = field(default=lambda: [])
    description: str = ""

    def not_supported_reasons(self, inputs: dict[str, Any]) -> list[Reason]:
        reasons = [_as_reason(r) for r in self.available()] or [_as_reason(r) for r in self.check(inputs)]
        return [r for r in reasons if r.expected] or reasons


def _as_reason(r: Reason | str) -> Reason:
    return r if isinstance(r, Reason) else Reason(str(r))


def register(backend: Backend) -> Backend:
    """Append ``backend`` to its op's priority list (replacing one of the same name)."""
    lst = _registry.setdefault(backend.op, [])
    lst[:] = [b for b in lst if b.name != backend.name]
    lst.append(backend)
    return backend


def backends(op: str) -> list[Backend]:
    """The backends of ``op`` in priority order."""
    return list(_registry.get(op, []))


def forced_backend(explicit: str | None = None) -> str | None:
    """The backend the user forced: ``explicit`` > ``use_backend`` > ``MMKERNELS_BACKEND``."""
    for value in (explicit, _forced[-1] if _forced else None, os.environ.get("MMKERNELS_BACKEND")):
        if value is None or value == "":
            continue
        value = value.strip().lower()
        if value == AUTO:
            return None
        if value not in KNOWN_BACKENDS:
            raise ValueError(
                f"backend: got {value!r}, expected one of {', '.join((AUTO,) + KNOWN_BACKENDS)}"
            )
        return value
    return None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for every mmkernels op called inside the block (``None``/"auto": auto)."""
    if name is not None:
        name = name.strip().lower()
        if name != AUTO and name not in KNOWN_BACKENDS:
            raise ValueError(f"use_backend: got {name!r}, expected one of {(AUTO,) + KNOWN_BACKENDS}")
    _forced.append(name if name is not None else AUTO)
    try:
        yield
    finally:
        _forced.pop()


def _compiling() -> bool:
    try:
        import torch

        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover - torch without torch.compiler
        return False


def _warn_once(op: str, backend: str, reason: Reason, chosen: str) -> None:
    key = f"{op}:{backend}:{reason.text}"
    if reason.expected or key in _warned:
        return
    if _compiling():
        # warnings.warn inside a torch.compile trace is a graph break; the eager call warns
        return
    _warned.add(key)
    warnings.warn(
        f"mmkernels.{op}: backend {backend!r} not used ({reason.text}); falling back to {chosen!r}",
        stacklevel=4,
    )


def select(op: str, inputs: dict[str, Any], backend: str | None = None) -> Backend:
    """Pick the backend that runs ``op`` on ``inputs``.

    Raises :class:`BackendNotSupportedError` when the forced backend (or, in auto mode,
    every backend) cannot run the call, with the reasons of each.
    """
    candidates = _registry.get(op, [])
    forced = forced_backend(backend)
    if _explaining and _explaining[-1] == op:
        raise _Explained(_explanation(op, candidates, inputs, forced))
    chosen = _select(op, candidates, inputs, forced)
    for calls, with_inputs in _recorders:
        calls.append((op, chosen.name, inputs) if with_inputs else (op, chosen.name))
    return chosen


def _select(op: str, candidates: list[Backend], inputs: dict[str, Any], forced: str | None) -> Backend:
    if forced is not None:
        matching = [b for b in candidates if b.name == forced]
        if not matching:
            raise BackendNotSupportedError(
                f"mmkernels.{op}: backend {forced!r} is forced but {op} has no such backend "
                f"(it has: {', '.join(b.name for b in candidates)})"
            )
        reasons = matching[0].not_supported_reasons(inputs)
        if reasons:
            raise BackendNotSupportedError(
                f"mmkernels.{op}: backend {forced!r} is forced but cannot run this call: "
                + "; ".join(r.text for r in reasons)
            )
        return matching[0]
    rejected: list[tuple[Backend, list[Reason]]] = []
    for b in candidates:
        reasons = b.not_supported_reasons(inputs)
        if not reasons:
            for rb, rr in rejected:
                for r in rr:
                    _warn_once(op, rb.name, r, b.name)
            return b
        rejected.append((b, reasons))
    detail = "; ".join(f"{b.name}: " + ", ".join(r.text for r in rr) for b, rr in rejected)
    raise BackendNotSupportedError(f"mmkernels.{op}: no backend can run this call ({detail})")


# --------------------------------------------------------------------------------------
# observing dispatch: explain() and record()
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Explanation:
    """Which backend a call would run on (``chosen``: None when none can), whether the user forced
    it (``forced``), and the reasons of every backend that cannot run it (empty: it can)."""

    op: str
    chosen: str | None
    forced: str | None
    reasons: dict[str, list[str]]

    def __str__(self) -> str:
        head = f"mmkernels.{self.op}: runs on {self.chosen!r}" if self.chosen else f"mmkernels.{self.op}: no backend"
        if self.forced:
            head += f" (forced: {self.forced!r})"
        lines = [head]
        for name, why in self.reasons.items():
            mark = "->" if name == self.chosen else "  "
            lines.append(f"  {mark} {name:10s} " + ("yes" if not why else "no: " + "; ".join(why)))
        return "\n".join(lines)


class _Explained(Exception):
    def __init__(self, explanation: Explanation):
        super().__init__(str(explanation))
        self.explanation = explanation


def _explanation(op: str, candidates: list[Backend], inputs: dict[str, Any], forced: str | None) -> Explanation:
    reasons = {b.name: [r.text for r in b.not_supported_reasons(inputs)] for b in candidates}
    if forced is not None:
        chosen = forced if not reasons.get(forced, ["no such backend"]) else None
    else:
        chosen = next((name for name, why in reasons.items() if not why), None)
    return Explanation(op, chosen, forced, reasons)


def explain(op: str, *args: Any, backend: str | None = None, **kwargs: Any) -> Explanation:
    """Which backend ``mmkernels.<op>(*args, **kwargs)`` would run on, and why every other one
    would not — without running it (the op's validation still runs: bad input raises).

    Example::

        print(mk.dispatch.explain("attention", q, k, v, is_causal=True))
    """
    import mmkernels

    fn = getattr(mmkernels, op, None)
    if fn is None or op not in _registry:
        raise ValueError(f"op: {op!r} is not an mmkernels op (ops: {', '.join(sorted(_registry))})")
    _explaining.append(op)
    try:
        fn(*args, backend=backend, **kwargs)
    except _Explained as exc:
        return exc.explanation
    finally:
        _explaining.pop()
    raise RuntimeError(f"mmkernels.{op} returned without dispatching (an empty or trivial input?)")


@contextlib.contextmanager
def record(with_inputs: bool = False) -> Iterator[list[tuple]]:
    """Record which backend ran each mmkernels op call inside the block::

        with mk.dispatch.record() as calls:
            model(**inputs)
        print(calls)          # [("attention", "triton"), ("token_pool", "triton"), ...]

    ``with_inputs=True``: entries are (op, backend, inputs) with the inputs the backend received.
    """
    calls: list[tuple] = []
    entry = (calls, with_inputs)
    _recorders.append(entry)
    try:
        yield calls
    finally:
        _recorders.remove(entry)
