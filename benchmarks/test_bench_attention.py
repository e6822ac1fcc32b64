"""Performance suite of `mmkernels bench attention`'s cases (`mmkernels/bench/cases_attention.py`): the model
presets × `suite_backends` × `suite_modes`. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("attention"))
def test_attention(benchmark, case):
    run(benchmark, case)
