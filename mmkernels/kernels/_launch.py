"""Choosing a kernel's launch configuration on a GPU (shared by the kernel families).

Built lazily, at the first launch: importing a kernel module never queries a device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable

import triton

_AUTOTUNED: dict = {}


def gpu_launcher(fn, make_configs: Callable[[], list], key: list[str], cache_key: Hashable):
    """(kernel, launch kwargs) for a CUDA launch of the ``@triton.jit`` function ``fn``.

    ``fn`` autotuned over ``make_configs()`` (one autotuner per ``cache_key``, tuned once per
    value of the ``key`` arguments), or — with ``MMKERNELS_AUTOTUNE=0``, as the tests on a GPU
    run — the first candidate untuned: one compile per specialisation and no tuning runs.
    """
    if os.environ.get("MMKERNELS_AUTOTUNE", "1") == "0":
        cfg = make_configs()[0]
        return fn, dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cache_key not in _AUTOTUNED:
        _AUTOTUNED[cache_key] = triton.autotune(configs=make_configs(), key=key)(fn)
    return _AUTOTUNED[cache_key], {}
