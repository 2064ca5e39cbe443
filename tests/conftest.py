"""Test setup. Without CUDA, kernels run on CPU through Triton's interpreter, which must be switched on before
Triton is first imported; this file is loaded by pytest before any test module, so it is set here."""

import os
import sys

import pytest
import torch

# On a GPU, test every kernel variant with one config instead of autotuning each (see kernels/configs.py).
os.environ.setdefault("DIFF_ATTN_AUTOTUNE", "0")

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers (tolerances, cases)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHARED_REFERENCE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poison():
    """Kernel outputs start as NaN, so an element a kernel never writes fails the comparison."""
    from kernels.alloc import poison_outputs

    with poison_outputs():
        yield


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bf16 numerics, timings)")
    config.addinivalue_line("markers", "slow: long-running on CPU")
    config.addinivalue_line("markers", "aot: ahead-of-time compilation for sm_80/sm_90 (CPU CI; skipped by device_check)")
