"""The pytest-benchmark suite (performance CI): ``pytest benchmarks``.

- On a machine without a GPU it runs the CPU backends at CPU-scaled sizes on one thread
  (``MMK_BENCH_CPU_THREADS``): a smoke test that stays green and takes seconds
  (``scripts/test.sh`` runs it with ``--benchmark-disable``).
- On CUDA it runs the real model sizes; ``scripts/perf_gate.sh`` writes the JSON and compares it
  with ``benchmarks/baselines/<device>.json`` (``mmkernels bench compare``, 10 % threshold).

Results files carry the device, versions and commit (``machine_info.mmkernels_*``). The Triton
interpreter is never switched on here: interpreted kernels are not timed.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

HAS_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None


def pytest_configure(config):
    import torch

    if not torch.cuda.is_available():
        # one thread, as `mmkernels bench` on a CPU: with two, another busy process stalls
        # OpenMP barriers for whole scheduler ticks (0.15 ms cases measured at 8-40 ms)
        torch.set_num_threads(int(os.environ.get("MMK_BENCH_CPU_THREADS", "1")))

if HAS_PYTEST_BENCHMARK:

    def pytest_benchmark_update_machine_info(config, machine_info):
        from mmkernels.bench import env

        info = env.describe()
        commit, dirty = env.git_commit()
        machine_info.update(mmkernels_device=info["device"]["name"], mmkernels_device_slug=info["device"]["slug"],
                            mmkernels_device_info=info["device"], mmkernels_versions=info["versions"],
                            mmkernels_commit=commit, mmkernels_git_dirty=dirty, mmkernels_date=env.now_iso())

else:  # without the plugin, each benchmark body still runs once (the smoke test)

    class _OnceBenchmark:
        def __init__(self):
            self.extra_info = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, target, args=(), kwargs=None, setup=None, **_):
            if setup is not None:
                setup()
            return target(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _OnceBenchmark()
