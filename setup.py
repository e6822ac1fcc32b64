"""Build of the optional CUDA extension ``mmkernels._C``; all metadata lives in pyproject.toml.

The extension is compiled from ``csrc/*.cu`` + ``csrc/*.cpp`` only when

* ``MMKERNELS_SKIP_CUDA_BUILD`` is not set to 1, and csrc/ has sources, and
* ``MMKERNELS_FORCE_CUDA=1``, or torch is importable, built with CUDA (``torch.version.cuda``)
  and nvcc is found (``CUDA_HOME`` as torch.utils.cpp_extension resolves it).

Otherwise the package installs as pure Python and the Triton/PyTorch backends are used.
Architectures: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0": A100, H100), so the build never
queries a GPU.  This file never downloads anything and never runs git, pip or nvidia-smi.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
EXT_NAME = "mmkernels._C"
DEFAULT_ARCH_LIST = "8.0;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_sources(csrc: str = CSRC) -> list[str]:
    """The extension's sources, relative to this file (setuptools wants relative paths)."""
    found = sorted(glob.glob(os.path.join(csrc, "*.cu")) + glob.glob(os.path.join(csrc, "*.cpp")))
    return [os.path.relpath(p, HERE) for p in found]


def cuda_build_decision(csrc: str = CSRC) -> tuple[bool, str]:
    """(build?, why) for the CUDA extension, from the environment only (no GPU query)."""
    if _flag("MMKERNELS_SKIP_CUDA_BUILD"):
        return False, "MMKERNELS_SKIP_CUDA_BUILD=1"
    if not cuda_sources(csrc):
        return False, "csrc/ has no .cu/.cpp sources"
    if _flag("MMKERNELS_FORCE_CUDA"):
        return True, "MMKERNELS_FORCE_CUDA=1"
    try:
        import torch
    except Exception as exc:  # not installed in an isolated build env: pure-Python install
        return False, f"torch is not importable ({exc.__class__.__name__}: {exc})"
    if not getattr(torch.version, "cuda", None):
        return False, f"torch {torch.__version__} is built without CUDA"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:
        return False, f"torch.utils.cpp_extension is not importable ({exc})"
    if CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return False, f"nvcc not found at {nvcc}"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc at {nvcc}"


def default_max_jobs() -> int:
    """Parallel nvcc jobs: one per core, but at most one per 4 GiB of memory (nvcc peaks near that)."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        cores = min(cores, max(1, kib // (4 * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        pass
    return max(1, cores)


def cuda_extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(); empty when nothing is to be built."""
    build, why = cuda_build_decision()
    if not build:
        print(f"mmkernels: not building the CUDA extension {EXT_NAME}: {why}", file=sys.stderr)
        return {}
    print(f"mmkernels: building the CUDA extension {EXT_NAME}: {why}", file=sys.stderr)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        name=EXT_NAME,
        sources=cuda_sources(),
        include_dirs=[CSRC],
        extra_compile_args={
            # no -std: torch picks the standard its headers need (C++20 from torch 2.13 on)
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


if __name__ == "__main__":
    setup(**cuda_extension_kwargs())
