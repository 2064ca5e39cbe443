"""Fused differential attention for PyTorch, written in Triton.

    from kernels import diff_attn, diff_attn_reference

`diff_attn` is the fused kernel (forward and backward); `diff_attn_reference` is the same operation in plain
PyTorch (the eager baseline). Importing this package does not import Triton.

Note: Hugging Face's `kernels` package uses the same import name; install the two in separate environments.
"""

from .api import diff_attn
from .reference import diff_attn_reference, rms_norm_epilogue
from .runtime import interpreter_enabled, triton_available, triton_unavailable_reason

__all__ = [
    "diff_attn",
    "diff_attn_reference",
    "rms_norm_epilogue",
    "interpreter_enabled",
    "triton_available",
    "triton_unavailable_reason",
]
__version__ = "0.1.0"
