"""Performance suite of `mmkernels bench attention_varlen`'s cases (`mmkernels/bench/cases_attention_varlen.py`):
the model presets × `suite_backends` × `suite_modes`. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("attention_varlen"))
def test_attention_varlen(benchmark, case):
    run(benchmark, case)
