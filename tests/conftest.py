"""Test set-up: Triton kernels run in the interpreter on CPU tensors when no GPU is present.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a function, so it is set here,
before any test module imports ``mmkernels.kernels``.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU machines)")
    config.addinivalue_line("markers", "slow: long-running case (a subprocess, an AOT compile, an emulation build)")
    config.addinivalue_line("markers", "fuzz: seeded random-shape fuzz cases (`-m fuzz` draws the long run)")


def pytest_collection_modifyitems(config, items):
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
