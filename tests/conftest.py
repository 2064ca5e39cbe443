"""Test setup. Without CUDA, kernels run on CPU through Triton's interpreter, which must be switched on before
Triton is first imported; this file is loaded by pytest before any test module, so it is set here."""

import os
import signal
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


@pytest.fixture
def form(monkeypatch):
    """`form("separate" | "fused" | "atomic")` selects the dense backward form for this test (DIFF_ATTN_BWD, outside
    deterministic mode, which refuses `atomic`) and checks that `configs.bwd_form` took it."""
    from kernels import configs  # imported here: Triton only after the interpreter switch above

    def set_form(name):
        monkeypatch.setenv("DIFF_ATTN_BWD", name)
        monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
        assert configs.bwd_form() == name

    return set_form


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (bf16 numerics, timings)")
    config.addinivalue_line("markers", "slow: long-running on CPU")
    config.addinivalue_line("markers", "aot: ahead-of-time compilation for sm_80/sm_90 (CPU CI; skipped by device_check)")


# Per-test time limit (seconds) from $DIFFCLIP_TEST_TIMEOUT_S, used by benchmarks/device_check.sh so that one hung
# test on a lent GPU fails alone instead of taking the whole step (and its summary) with it. SIGALRM-based, so it
# needs no plugin the GPU image may lack; main thread only (where pytest runs tests). Unset or 0: no limit.
_TEST_TIMEOUT_S = float(os.environ.get("DIFFCLIP_TEST_TIMEOUT_S", "0") or 0)


class TestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if _TEST_TIMEOUT_S <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past DIFFCLIP_TEST_TIMEOUT_S={_TEST_TIMEOUT_S:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, _TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
