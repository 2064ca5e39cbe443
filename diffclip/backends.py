"""Attention backends of the model: one registry, one signature (that of `kernels.diff_attn`).

| name   | implementation                                   | runs on                                    |
|--------|--------------------------------------------------|--------------------------------------------|
| eager  | `kernels.diff_attn_reference` (both N x N maps)  | anywhere                                   |
| sdpa   | two `F.scaled_dot_product_attention` calls, difference and norm in the activation dtype | anywhere |
| triton | `kernels.diff_attn`, norm epilogue fused         | CUDA with Triton; CPU with TRITON_INTERPRET=1 |
| auto   | triton on CUDA in fp16/bf16 when Triton imports, else sdpa | anywhere                         |

An explicitly named backend never falls back: if it cannot run, the forward raises RuntimeError saying why.
Choice: the argument, else $DIFFCLIP_ATTN_BACKEND, else auto.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

import kernels

ENV_VAR = "DIFFCLIP_ATTN_BACKEND"


def combine_outputs(o1, o2, lam, dtype, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    """o1 − λ·o2 from the two maps' outputs (B, H, N, 2d), then the optional RMS-norm epilogue, in `dtype`.

    What a user of two SDPA calls writes (timm's DiffAttention; the official code takes the difference in the
    activation dtype too), in as few kernels as PyTorch allows: one `addcmul` (fp32 arithmetic inside, one
    rounding of the result) and one fused `rms_norm` (fp32 statistics) with out_scale folded into its weight. λ is
    rounded to the activation dtype for the product, as in those codes (a number λ stays exact); the triton
    backend keeps λ and the difference in fp32. fp32 inputs stay fp32 throughout.
    λ: number, 0-d, (H,) or broadcastable to (B, H, N).
    """
    o1, o2 = o1.to(dtype), o2.to(dtype)
    if isinstance(lam, torch.Tensor):
        lam = lam.to(dtype)
        if lam.dim() == 1:  # per head: (H,) -> (H, 1, 1)
            lam = lam.view(-1, 1, 1)
        elif lam.dim() >= 2:  # (.., H, N) -> (.., H, N, 1), broadcast over the 2d features
            lam = lam.unsqueeze(-1)
        o = torch.addcmul(o1, o2, lam, value=-1)
    else:
        o = torch.add(o1, o2, alpha=-lam)
    if norm_weight is not None:
        # (2d,) weight times a number: folding out_scale here costs nothing and saves a pass over the output.
        w = (norm_weight.to(torch.promote_types(dtype, torch.float32)) * out_scale).to(dtype)
        return F.rms_norm(o, (o.shape[-1],), w, norm_eps)
    return o if out_scale == 1.0 else o * out_scale


def sdpa_pairs(q, k, v, causal=False, scale=None):
    """The two maps' outputs (B, H, N, 2d) by two SDPA calls: query/key heads 2h and 2h+1 against V of head h."""
    o1 = F.scaled_dot_product_attention(q[:, 0::2], k[:, 0::2], v, is_causal=causal, scale=scale)
    o2 = F.scaled_dot_product_attention(q[:, 1::2], k[:, 1::2], v, is_causal=causal, scale=scale)
    return o1, o2


def sdpa_diff_attn(q, k, v, lam, *, causal=False, scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    """Differential attention as two SDPA calls and `combine_outputs`."""
    o1, o2 = sdpa_pairs(q, k, v, causal, scale)
    return combine_outputs(o1, o2, lam, q.dtype, norm_weight, norm_eps, out_scale)


def _triton_reason(device: torch.device) -> str | None:
    return kernels.triton_unavailable_reason(device)


# name -> (function, why it cannot run on a device or None)
BACKENDS: dict[str, tuple[Callable, Callable[[torch.device], str | None]]] = {
    "eager": (kernels.diff_attn_reference, lambda device: None),
    "sdpa": (sdpa_diff_attn, lambda device: None),
    "triton": (kernels.diff_attn, _triton_reason),
}
NAMES = (*BACKENDS, "auto")


def check_name(name) -> str:
    """The backend name to use: `name`, else $DIFFCLIP_ATTN_BACKEND, else "auto". Unknown names raise ValueError;
    "triton" without Triton installed raises RuntimeError right away."""
    source = "attn_backend"
    if name is None:
        name, source = os.environ.get(ENV_VAR) or "auto", ENV_VAR
    if not isinstance(name, str) or name.lower() not in NAMES:
        raise ValueError(f"{source} must be one of {', '.join(NAMES)}; got {name!r}")
    name = name.lower()
    if name == "triton" and not kernels.triton_available():
        raise RuntimeError("attention backend 'triton' needs Triton (pip install 'triton>=3.6', Linux); "
                           "choose 'sdpa' or 'eager' to run without it")
    return name


def resolve(name: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> str:
    """The concrete backend for a call. "auto" picks triton where it runs well (CUDA, fp16/bf16, a supported head
    dim; the kernel's fp32 path is exact but not tuned for speed), else sdpa; a named backend that cannot run here
    raises RuntimeError (no silent fallback)."""
    if name == "auto":
        ok = (device.type == "cuda" and _triton_reason(device) is None
              and head_dim in (16, 32, 64, 128) and dtype in (torch.float16, torch.bfloat16))
        return "triton" if ok else "sdpa"
    reason = BACKENDS[name][1](device)
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} cannot run here: {reason}")
    return name


def get(name: str) -> Callable:
    return BACKENDS[name][0]
