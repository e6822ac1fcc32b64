"""Performance suite of `mmkernels bench qformer_model`'s cases (`mmkernels/bench/cases_qformer_model.py`): the model
presets × `suite_backends` × `suite_modes`. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("qformer_model"))
def test_qformer_model(benchmark, case):
    run(benchmark, case)
