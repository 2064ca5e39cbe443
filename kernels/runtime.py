"""Where the Triton path can run: Triton importable, and a CUDA device or Triton's CPU interpreter.

Kept free of a top-level `import triton` so that `import kernels` works on machines without Triton.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

CPU_HINT = (
    "set TRITON_INTERPRET=1 before Triton is imported to run the kernel on CPU through Triton's interpreter "
    "(slow; for testing), or use kernels.diff_attn_reference"
)


# Looked up once, at import: torch.compile (Dynamo, torch <= 2.11) refuses to trace `importlib.util.find_spec`, and
# this is read on every call of the triton backend, also inside compiled models.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the `triton` package can be imported (it is not imported here)."""
    return _TRITON_FOUND


def interpreter_enabled() -> bool:
    """True when Triton's interpreter is requested (TRITON_INTERPRET=1): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on `device` here, or None when it can."""
    if not triton_available():
        return "Triton is not installed (pip install 'triton>=3.6'; Linux only); use kernels.diff_attn_reference"
    if interpreter_enabled():
        if device.type != "cpu":
            return f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got a tensor on {device}"
        return None
    if device.type == "cuda":
        return None
    return f"the Triton kernel needs CUDA tensors, got a tensor on {device}; {CPU_HINT}"


def require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


def device_guard(device: torch.device):
    """Make `device` current for a launch: Triton launches (and autotunes) on the *current* CUDA device, whatever
    device the tensors are on, so tensors on cuda:1 with cuda:0 current would otherwise run on the wrong GPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
