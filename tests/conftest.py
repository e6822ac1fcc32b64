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


def pytest_collection_modifyitems(config, items):
    if "soak" not in (config.getoption("-m") or ""):
        opt_in = pytest.mark.skip(reason="opt-in load test: run with -m soak")
        for item in items:
            if "soak" in item.keywords:
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
