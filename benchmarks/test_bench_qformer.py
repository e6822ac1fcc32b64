"""Performance suite of `mmkernels bench qformer`'s cases (`mmkernels/bench/cases_qformer.py`): the model
presets × `suite_backends` × `suite_modes`. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("qformer"))
def test_qformer(benchmark, case):
    run(benchmark, case)
