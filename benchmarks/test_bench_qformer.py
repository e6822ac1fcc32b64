"""Performance suite: mmkernels.qformer_cross_attention (BLIP-2 / InstructBLIP Q-Former cross-attention).

Cases: the model presets of DESIGN.md × backends × modes (``mmkernels/bench/cases_qformer.py``,
``suite_backends`` / ``suite_modes``); CPU-scaled CPU backends without a GPU. Skips with the
reason when the op is not in this build. See benchmarks/README.md.
"""

import pytest

from mmkernels.bench.suite import params, run


@pytest.mark.parametrize("case", params("qformer"))
def test_qformer(benchmark, case):
    run(benchmark, case)
