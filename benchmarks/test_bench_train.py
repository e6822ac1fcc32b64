"""Performance suite of `mmkernels bench train`'s cases (`mmkernels/bench/cases_train.py`): one training
step of a Qwen2.5-VL-style model, padded vs packed, with and without SAC. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("train"))
def test_train(benchmark, case):
    run(benchmark, case)
