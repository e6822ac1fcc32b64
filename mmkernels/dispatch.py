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
    "Reason",
    "backends",
    "forced_backend",
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
    is supported); ``run(**inputs)`` executes it.  ``available()`` returns reasons that hold
    for every call (missing package, missing extension) and is what ``mmkernels info`` shows.
    """

    name: str
    op: str
    check: Callable[[dict[str, Any]], list]
    run: Callable[..., Any]
    available: Callable[[], list] = field(default=lambda: [])
    description: str = ""

    def not_supported_reasons(self, inputs: dict[str, Any]) -> list[Reason]:
        reasons = [_as_reason(r) for r in self.available()]
        if not reasons:
            reasons = [_as_reason(r) for r in self.check(inputs)]
        return reasons


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
