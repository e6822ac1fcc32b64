"""Performance suite of `mmkernels bench vit_encoder`'s cases (`mmkernels/bench/cases_vit_encoder.py`):
the model presets × `suite_backends` × `suite_modes`. See benchmarks/README.md."""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("vit_encoder"))
def test_vit_encoder(benchmark, case):
    run(benchmark, case)
