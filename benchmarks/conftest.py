"""The pytest-benchmark suite (performance CI): ``pytest benchmarks [--mmk-json FILE]``. Without a
GPU: the CPU backends at CPU-scaled sizes on one thread, a smoke test of seconds (``scripts/test.sh``
runs it with ``--benchmark-disable``); the Triton interpreter is never switched on here. On CUDA the
real sizes. ``--mmk-json FILE`` writes the cases as one ``mmkernels bench --json`` document: what
``scripts/perf_gate.sh`` compares with ``benchmarks/baselines/<device>.json``."""

from __future__ import annotations


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

