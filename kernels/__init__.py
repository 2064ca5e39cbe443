"""Fused differential attention for PyTorch, written in Triton.

    from kernels import diff_attn, diff_attn_reference

`diff_attn` is the fused kernel (forward and backward); `diff_attn_reference` is the same operation in plain
PyTorch (the eager baseline). Importing this package does not import Triton.

Note: Hugging Face's `kernels` package uses the same import name; install the two in separate environments.
"""

from .api import diff_attn
from .reference import diff_attn_reference, rms_norm_epilogue
from .runtime import interpreter_enabled, triton_available, triton_unavailable_reason
from .api_lm import diff_attn_decode, diff_attn_varlen
from .reference_lm import (diff_attn_decode_reference, diff_attn_gqa_reference, diff_attn_v2_reference,
                           diff_attn_varlen_reference)

__all__ = [
    "diff_attn",
    "diff_attn_reference",
    "rms_norm_epilogue",
    "interpreter_enabled",
    "triton_available",
    "triton_unavailable_reason",
    "diff_attn_varlen",
    "diff_attn_decode",
    "diff_attn_varlen_reference",
    "diff_attn_decode_reference",
    "diff_attn_gqa_reference",
    "diff_attn_v2_reference",
]
__version__ = "0.1.0"
