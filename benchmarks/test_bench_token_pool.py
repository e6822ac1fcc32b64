"""Performance suite of `mmkernels bench token_pool`'s cases (`mmkernels/bench/cases_token_pool.py`): the model
presets × `suite_backends` × `suite_modes`. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("token_pool"))
def test_token_pool(benchmark, case):
    run(benchmark, case)
