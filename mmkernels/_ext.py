"""Guarded loader of the optional CUDA extension ``mmkernels._C`` (built from ``csrc/``).

The extension is built by ``setup.py`` when torch with CUDA and nvcc are present at install
time, or just in time with ``torch.utils.cpp_extension.load`` (ninja) when the user asks for it
with ``MMKERNELS_JIT_BUILD=1``.  Importing this module touches no GPU, builds nothing and never
raises; :func:`load` tries once and caches the result, and :func:`unavailable_reason` says why
the extension cannot be used (it is what ``mmkernels info`` and the ``cuda`` backend report).
"""

from __future__ import annotations

import glob
import importlib
import os
import threading
from types import ModuleType

__all__ = ["available", "load", "unavailable_reason"]

EXT_MODULE = "mmkernels._C"
JIT_NAME = "mmkernels_C"
DEFAULT_ARCH_LIST = "8.0;9.0"

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_reason = ""


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def csrc_dir() -> str:
    """``csrc/`` of a source checkout (absent from wheels: then JIT builds are impossible)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _sources() -> list[str]:
    d = csrc_dir()
    return sorted(glob.glob(os.path.join(d, "*.cu")) + glob.glob(os.path.join(d, "*.cpp")))


def _import_extension() -> ModuleType:
    import torch  # noqa: F401  (the extension links against torch's libraries)

    return importlib.import_module(EXT_MODULE)


def _import_built() -> tuple[ModuleType | None, str]:
    try:
        return _import_extension(), ""
    except ModuleNotFoundError as exc:
        if exc.name == EXT_MODULE:
            if not os.path.isdir(csrc_dir()):
                return None, "not built (this install ships no compiled extension and no csrc/)"
            if not _sources():
                return None, "not built: csrc/ has no CUDA sources yet"
            import torch

            if torch.version.cuda is None:  # a JIT build needs a CUDA torch too: do not suggest it
                return None, f"not built (torch {torch.__version__} is a CPU-only build: the extension needs CUDA)"
            return None, (
                "not built (install with torch+CUDA and nvcc present, "
                "or set MMKERNELS_JIT_BUILD=1 to build it just in time)"
            )
        return None, f"import {EXT_MODULE} failed: {exc}"
    except Exception as exc:  # a stale or ABI-mismatched build
        return None, f"import {EXT_MODULE} failed: {exc.__class__.__name__}: {exc}"


def _jit_build() -> tuple[ModuleType | None, str]:
    """Build with ninja into torch's extension cache (only called when MMKERNELS_JIT_BUILD=1)."""
    sources = _sources()
    if not sources:
        return None, "MMKERNELS_JIT_BUILD=1 but there is nothing to build"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:
        return None, f"MMKERNELS_JIT_BUILD=1 but torch.utils.cpp_extension is not importable: {exc}"
    if not torch.version.cuda:
        return None, f"MMKERNELS_JIT_BUILD=1 but torch {torch.__version__} is built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return None, "MMKERNELS_JIT_BUILD=1 but nvcc was not found (set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return None, "MMKERNELS_JIT_BUILD=1 but ninja is not installed (pip install ninja)"
    # without it torch asks the GPU for its arch; the build must not depend on one being present
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    try:
        module = cpp_extension.load(
            name=JIT_NAME,
            sources=sources,
            extra_include_paths=[csrc_dir()],
            # no -std: torch picks the standard its headers need (C++20 from torch 2.13 on)
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            verbose=_flag("MMKERNELS_JIT_VERBOSE"),
        )
    except Exception as exc:
        return None, f"JIT build failed: {exc.__class__.__name__}: {exc}"
    return module, ""


def load() -> ModuleType | None:
    """The extension module, or None (see :func:`unavailable_reason`).  Never raises."""
    global _loaded, _module, _reason
    if _loaded:
        return _module
    with _lock:
        if not _loaded:
            try:
                module, reason = _import_built()
                if module is None and _flag("MMKERNELS_JIT_BUILD"):
                    module, jit_reason = _jit_build()
                    reason = "" if module is not None else f"{reason}; {jit_reason}"
                _module, _reason = module, reason
            except Exception as exc:  # pragma: no cover - last-resort guard: never raise
                _module, _reason = None, f"loading failed: {exc.__class__.__name__}: {exc}"
            _loaded = True
    return _module


def _cuda_device_reason() -> str:
    try:
        import torch

        if not torch.version.cuda:
            return f"torch {torch.__version__} is built without CUDA"
        if not torch.cuda.is_available():
            return "no CUDA device"
    except Exception as exc:  # pragma: no cover
        return f"CUDA check failed: {exc}"
    return ""


def unavailable_reason() -> str:
    """Why the extension cannot run here ("" when it can): not built, import error, or no CUDA."""
    if load() is None:
        return _reason
    return _cuda_device_reason()


def available() -> bool:
    """True when the extension is loaded and a CUDA device is present."""
    return not unavailable_reason()


def _reset_for_tests() -> None:
    global _loaded, _module, _reason
    with _lock:
        _loaded, _module, _reason = False, None, ""
