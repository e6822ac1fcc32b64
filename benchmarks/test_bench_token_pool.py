"""Performance suite: mmkernels.token_pool (LLaVA-OneVision, Gemma 3, InternVL, LLaVA-NeXT-Video poolers).

Cases: the model presets of DESIGN.md × backends × modes (``mmkernels/bench/cases_token_pool.py``,
``suite_backends`` / ``suite_modes``); CPU-scaled CPU backends without a GPU. Skips with the
reason when the op is not in this build. See benchmarks/README.md.
"""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("token_pool"))
def test_token_pool(benchmark, case):
    run(benchmark, case)
