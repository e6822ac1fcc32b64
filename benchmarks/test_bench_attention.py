"""Performance suite: mmkernels.attention on the vision encoders' and Q-Former's attention shapes.

Cases: the model presets of DESIGN.md × backends × modes (``mmkernels/bench/cases_attention.py``,
``suite_backends`` / ``suite_modes``); CPU-scaled CPU backends without a GPU. Skips with the
reason when the op is not in this build. See benchmarks/README.md.
"""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("attention"))
def test_attention(benchmark, case):
    run(benchmark, case)
