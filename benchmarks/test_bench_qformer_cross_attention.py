"""Performance suite of `mmkernels bench qformer_cross_attention`'s cases
(`mmkernels/bench/cases_qformer_cross_attention.py`): the model presets × `suite_backends` × `suite_modes`.
See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("qformer_cross_attention"))
def test_qformer_cross_attention(benchmark, case):
    run(benchmark, case)
