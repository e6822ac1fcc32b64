"""Performance suite of `mmkernels bench prune`'s cases (`mmkernels/bench/cases_prune.py`):
the model presets × `suite_backends` × `suite_modes`. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("prune"))
def test_prune(benchmark, case):
    run(benchmark, case)
