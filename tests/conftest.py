"""Test set-up: Triton kernels run in the interpreter on CPU tensors when no GPU is present.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function, so it is set here,
before any test module imports ``mmkernels.kernels``.
"""

import os
import tempfile

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"

# the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even (docs/interpreter_bf16.md)
from _interpreter_rounding import install as _install_bf16_rounding  # noqa: E402

BF16_ROUNDING = _install_bf16_rounding()

# A private inductor/AOTAutograd cache per test session: the on-disk cache is keyed on the traced
# graph, not on the custom ops' schemas, so a graph cached by another checkout (or before an op's
# signature changed) can be replayed against the wrong op and fail.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mmkernels-inductor-"))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU machines)")
    config.addinivalue_line("markers", "slow: long-running case (a subprocess, an AOT compile, an emulation build)")
    config.addinivalue_line("markers", "fuzz: seeded random-shape fuzz cases (`-m fuzz` draws the long run)")
    config.addinivalue_line("markers",
                            "soak: opt-in load test (`-m soak`): thousands of calls, memory and caches bounded")
    config.addinivalue_line("markers",
                            "scale: opt-in training-at-scale case (`-m scale`): 2-rank FSDP2, recompiles over 10 "
                            "image grids (minutes each in the interpreter; bash scripts/test.sh -m scale)")
    config.addinivalue_line("markers", "bf16grid: opt-in large cells of tests/test_bf16_grid.py (`-m bf16grid`)")


def pytest_report_header(config):
    return f"triton interpreter bf16 casts: {BF16_ROUNDING}"


def pytest_collection_modifyitems(config, items):
    selected = config.getoption("-m") or ""
    for marker, what in (("soak", "load test"), ("scale", "training-at-scale case")):
        if marker not in selected:
            opt_in = pytest.mark.skip(reason=f"opt-in {what}: run with -m {marker}")
            for item in items:
                # the marker itself: item.keywords also holds test names and parameter ids
                if item.get_closest_marker(marker) is not None:
                    item.add_marker(opt_in)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
