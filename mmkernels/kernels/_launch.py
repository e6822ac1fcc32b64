"""Choosing a kernel's launch configuration on a GPU (shared by the kernel families), and
recording launches instead of running them (what :mod:`mmkernels.tools.compile_report` compiles).

Built lazily, at the first launch: importing a kernel module never queries a device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import triton

_AUTOTUNED: dict = {}

# SMs of the GPU a captured launch is sized for (H100 / H200 SXM: 132).
_CAPTURE_SMS = 132


@dataclass
class Launch:
    """One kernel launch as a launcher made it: the ``@triton.jit`` function, its arguments
    exactly as passed (tensors, ints, constexprs, ``num_warps``/``num_stages``) and the launch
    configurations a GPU would try (the autotuner's candidates, first = the untuned default;
    ``[None]`` for a launcher that picks its one configuration itself)."""

    fn: object
    args: tuple
    kwargs: dict
    candidates: list = field(default_factory=list)


class _Capture:
    def __init__(self, arch: int) -> None:
        self.arch = arch  # compute capability x 10 of the target the launches are sized for
        self.launches: list[Launch] = []
        self.pending: dict = {}  # fn -> candidates announced by gpu_launcher for its next launch


_CAPTURE: list = []  # [the active _Capture]: launches are recorded, not run


def for_gpu(device_type: str) -> bool:
    """Whether a launcher sizes its launch for a GPU: a CUDA tensor, or a launch being captured
    for a GPU target (CPU tensors standing in for CUDA ones)."""
    return device_type == "cuda" or bool(_CAPTURE)


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (of an H100/H200 while capturing)."""
    if _CAPTURE:
        return _CAPTURE_SMS
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def target_arch(device) -> int:
    """Compute capability x 10 of the GPU a launch on ``device`` is sized for (the capture's
    target while capturing)."""
    if _CAPTURE:
        return _CAPTURE[-1].arch
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _config_kwargs(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def gpu_launcher(fn, make_configs: Callable[[], list], key: list[str], cache_key: Hashable,
                 reset_to_zero: list[str] | None = None):
    """(kernel, launch kwargs) for a CUDA launch of the ``@triton.jit`` function ``fn``.

    ``fn`` autotuned over ``make_configs()`` (one autotuner per ``cache_key``, tuned once per
    value of the ``key`` arguments), or — with ``MMKERNELS_AUTOTUNE=0``, as the tests on a GPU
    run — the first candidate untuned: one compile per specialisation and no tuning runs.
    While capturing, ``fn`` with the first candidate, every candidate announced to the capture.
    ``reset_to_zero``: arguments an autotuning run accumulates into (atomics), zeroed before
    each timed run and before the real one.
    """
    if _CAPTURE:
        configs = make_configs()
        _CAPTURE[-1].pending[fn] = configs
        return fn, _config_kwargs(configs[0])
    if os.environ.get("MMKERNELS_AUTOTUNE", "1") == "0":
        return fn, _config_kwargs(make_configs()[0])
    if cache_key not in _AUTOTUNED:
        _AUTOTUNED[cache_key] = triton.autotune(configs=make_configs(), key=key, reset_to_zero=reset_to_zero)(fn)
    return _AUTOTUNED[cache_key], {}


@contextlib.contextmanager
def capture_launches(arch: int = 90) -> Iterator[list[Launch]]:
    """Inside, every ``kernel[grid](...)`` launch of a ``@triton.jit`` function is recorded in
    the yielded list and not run, and launchers size their launches for a GPU (:func:`for_gpu`)
    of compute capability ``arch`` (x 10, :func:`target_arch`) even on CPU tensors — which
    therefore stand in for CUDA tensors of the same strides and alignment.  Outputs the
    launchers allocate stay unwritten."""
    from triton.runtime.jit import JITFunction

    cap = _Capture(arch)
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        cands = cap.pending.pop(self, None)
        if cands is None:  # the launcher chose its one configuration itself: None = as launched
            cands = [None]
        cap.launches.append(Launch(self, args, dict(kwargs), list(cands)))

    _CAPTURE.append(cap)
    JITFunction.run = record
    try:
        yield cap.launches
    finally:
        JITFunction.run = original
        _CAPTURE.remove(cap)
