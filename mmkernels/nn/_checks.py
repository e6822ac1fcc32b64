"""The module checks of the ``from_hf`` constructors: a wrong module (an ``nn.Linear``, another
model's attention, the parent instead of the submodule) raises ``ValueError`` naming the argument,
the type expected and the type given, instead of an ``AttributeError`` from deep inside — or, worse,
a drop-in built from whatever attributes happened to be there.

HF classes are recognised by the attributes ``from_hf`` reads (duck typing: transformers is an
optional dependency and its classes move between releases), not by ``isinstance``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["check_hf_module", "is_int", "is_linear", "is_norm", "is_number"]

_MISSING = object()

# one requirement: (attribute path, what it must be, predicate or None for "present")
Need = tuple[str, str, "Callable[[Any], bool] | None"]


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_linear(v) -> bool:
    return isinstance(v, nn.Linear)


def is_norm(v) -> bool:
    """A LayerNorm, or an RMSNorm-like module (a 1-D ``weight`` and an ``eps`` / ``variance_epsilon``)."""
    if isinstance(v, nn.LayerNorm):
        return True
    w = getattr(v, "weight", None)
    eps = getattr(v, "variance_epsilon", getattr(v, "eps", None))
    return isinstance(v, nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 1 and is_number(eps)


def _lookup(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _problems(module, needs: tuple[Need, ...]) -> list[str]:
    out, missing = [], []
    for path, what, ok in needs:
        if any(path.startswith(m + ".") for m in missing):
            continue  # its parent is already reported missing
        v = _lookup(module, path)
        if v is _MISSING:
            missing.append(path)
            out.append(f"no .{path}")
        elif ok is not None and not ok(v):
            got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            out.append(f".{path} is not {what} (got {got})")
    return out


def check_hf_module(where: str, arg: str, module, expected: str, needs: tuple[Need, ...],
                    children: tuple[str, ...] = ()) -> None:
    """Raise ``ValueError`` unless ``module`` has every attribute of ``needs`` (each passing its
    predicate).  ``children``: attributes that may hold the right module (a parent passed instead
    of its submodule), suggested in the message when they would pass."""
    problems = _problems(module, needs)
    if not problems:
        return
    hint = ""
    for name in children:
        child = getattr(module, name, None)
        if child is not None and not _problems(child, needs):
            hint = f"; did you mean {arg}.{name}?"
            break
    raise ValueError(f"{arg}: {where} expected {expected}, got {type(module).__name__} "
                     f"({'; '.join(problems)}){hint}")
