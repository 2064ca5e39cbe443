"""The differential-attention implementations the benchmark compares, all with `kernels.diff_attn`'s signature.

- triton:  ours, `kernels.diff_attn` (one fused pass).
- eager:   `kernels.diff_attn_reference` (both N x N maps materialised).
- sdpa2:   two SDPA calls with the 2d-wide V, then the λ difference (the timm way) = the model's "sdpa" backend.
- sdpa4:   V split into two halves of width d, four SDPA calls (head dims equal, so the flash backend takes
           them), concatenated, then the difference (the official Diff-Transformer way).
- compile: `torch.compile` of the eager reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffclip.backends import combine_outputs, sdpa_diff_attn
from kernels import diff_attn, diff_attn_reference, triton_unavailable_reason


def sdpa4_diff_attn(q, k, v, lam, *, causal=False, scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    d = q.shape[-1]
    va, vb = v[..., :d], v[..., d:]
    q1, k1, q2, k2 = q[:, 0::2], k[:, 0::2], q[:, 1::2], k[:, 1::2]
    o1 = torch.cat([F.scaled_dot_product_attention(q1, k1, va, is_causal=causal, scale=scale),
                    F.scaled_dot_product_attention(q1, k1, vb, is_causal=causal, scale=scale)], dim=-1)
    o2 = torch.cat([F.scaled_dot_product_attention(q2, k2, va, is_causal=causal, scale=scale),
                    F.scaled_dot_product_attention(q2, k2, vb, is_causal=causal, scale=scale)], dim=-1)
    # Same λ-difference and epilogue as sdpa2, on the concatenated halves.
    return combine_outputs(o1, o2, lam, q.dtype, norm_weight, norm_eps, out_scale)


_compiled = {}


def _compiled_reference(*args, **kwargs):
    if "fn" not in _compiled:
        # The bwd-only timing replays one graph's backward (retain_graph=True), which donated buffers forbid.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        _compiled["fn"] = torch.compile(diff_attn_reference, dynamic=False)
    return _compiled["fn"](*args, **kwargs)


PROVIDERS = {
    "triton": diff_attn,
    "eager": diff_attn_reference,
    "sdpa2": sdpa_diff_attn,
    "sdpa4": sdpa4_diff_attn,
    "compile": _compiled_reference,
}


def skip_reason(name: str, device: torch.device) -> str | None:
    """Why provider `name` cannot run here, or None."""
    if name == "triton":
        return triton_unavailable_reason(device)
    if name == "compile":
        try:
            import torch._dynamo  # noqa: F401
        except Exception as e:  # pragma: no cover
            return f"torch.compile unavailable: {e}"
    return None
