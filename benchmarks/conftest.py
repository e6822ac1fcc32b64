"""The pytest-benchmark suite (performance CI): ``pytest benchmarks [--mmk-json FILE]``.

Without a GPU it runs the CPU backends at CPU-scaled sizes on one thread, as ``mmkernels bench``
does: a smoke test of seconds (``scripts/test.sh`` runs it with ``--benchmark-disable``). On CUDA
the real sizes. ``--mmk-json FILE`` writes every case's row as one ``mmkernels bench --json``
document, the file ``scripts/perf_gate.sh`` compares with ``benchmarks/baselines/<device>.json``.
The Triton interpreter is never switched on here: interpreted kernels are not timed.
"""

from __future__ import annotations

import importlib.util

import pytest


def pytest_addoption(parser):
    parser.addoption("--mmk-json", metavar="FILE", help="write the cases as a `mmkernels bench --json` document")


def pytest_configure(config):
    import torch

    from mmkernels.bench.cli import CPU_THREADS

    if not torch.cuda.is_available():
        torch.set_num_threads(CPU_THREADS)


def pytest_sessionfinish(session):
    path = session.config.getoption("--mmk-json")
    if path:
        from mmkernels.bench import env, report, suite

        doc = report.new_doc("suite", "pytest benchmarks", suite.device(), config={"argv": ["pytest", "benchmarks"]},
                             ceilings=env.ceilings(suite.device()))
        report.write_json(path, {**doc, "cases": suite.ROWS})


if importlib.util.find_spec("pytest_benchmark") is None:  # without the plugin each case still runs once

    class _Once:
        def __init__(self):
            self.extra_info = {}

        def pedantic(self, target, setup=None, **_):
            setup and setup()
            return target()

    @pytest.fixture
    def benchmark():
        return _Once()
