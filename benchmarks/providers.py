"""The differential-attention implementations the benchmark compares, all with `kernels.diff_attn`'s signature.

- triton:         ours, `kernels.diff_attn` (one fused pass).
- eager:          `kernels.diff_attn_reference` (both N x N maps materialised; fp32 softmax and difference).
- eager-official: `kernels.reference.diff_attn_official`, the official Diff-Transformer code's dtype handling
                  (scores, difference and P·V in the activation dtype): what a user of the paper's code runs.
- sdpa2:          two SDPA calls with the 2d-wide V, then the λ difference and norm in the activation dtype in two
                  kernels (timm's way) = the model's "sdpa" backend. q/k dim d ≠ v dim 2d: FlashAttention cannot
                  take it; on recent torch cuDNN's fused attention or the memory-efficient kernel does.
- sdpa2-fp32:     the same two calls with the difference and norm in fp32 (~6 kernels): the yardstick of the first
                  H200 run (2026-11-28), kept so the old ratios can be read against today's.
- sdpa4:          V split into halves of width d, four SDPA calls (equal head dims: FlashAttention-eligible; the
                  official `multihead_flashdiff_2` and transformers' DiffLlama do this), concatenated, then the
                  difference as sdpa2.
- sdpa2-compile, sdpa4-compile: those under `torch.compile` (Inductor fuses the combine and the concatenation).
- compile:        `torch.compile` of the eager reference.
- triton-bwd-fused, triton-bwd-atomic: ours with the one-launch backward forms (DIFF_ATTN_BWD=fused: dK/dV and dQ
                  in one launch, deterministic; atomic: dQ by fp32 atomic adds, opt-in, not bitwise reproducible);
                  backward modes only (their forward is triton's).

Compiled providers are built per case (`fresh`): one compiled object serving every case would pass Dynamo's
recompile limit (8) in a full run and silently run eager code from then on. Each records how many graphs it
compiled and how many times a compiled graph ran, so the benchmark can check that compiled code is what it timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffclip.backends import combine_outputs, sdpa_diff_attn, sdpa_pairs
from kernels import diff_attn, diff_attn_reference, rms_norm_epilogue, triton_unavailable_reason
from kernels.reference import diff_attn_official


def combine_outputs_fp32(o1, o2, lam, dtype, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    """The first run's combine: both outputs cast to fp32, the difference and norm in fp32, one cast back."""
    acc = torch.promote_types(o1.dtype, torch.float32)
    if isinstance(lam, torch.Tensor):
        lam = lam.to(acc)
        lam = lam.view(-1, 1, 1) if lam.dim() == 1 else (lam.unsqueeze(-1) if lam.dim() >= 2 else lam)
    o = o1.to(acc) - lam * o2.to(acc)
    if norm_weight is not None:
        return rms_norm_epilogue(o, norm_weight, norm_eps, out_scale).to(dtype)
    return (o * out_scale).to(dtype)


def sdpa2_fp32_diff_attn(q, k, v, lam, *, causal=False, scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    o1, o2 = sdpa_pairs(q, k, v, causal, scale)
    return combine_outputs_fp32(o1, o2, lam, q.dtype, norm_weight, norm_eps, out_scale)


def sdpa4_diff_attn(q, k, v, lam, *, causal=False, scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    d = q.shape[-1]
    va, vb = v[..., :d], v[..., d:]
    q1, k1, q2, k2 = q[:, 0::2], k[:, 0::2], q[:, 1::2], k[:, 1::2]
    o1 = torch.cat([F.scaled_dot_product_attention(q1, k1, va, is_causal=causal, scale=scale),
                    F.scaled_dot_product_attention(q1, k1, vb, is_causal=causal, scale=scale)], dim=-1)
    o2 = torch.cat([F.scaled_dot_product_attention(q2, k2, va, is_causal=causal, scale=scale),
                    F.scaled_dot_product_attention(q2, k2, vb, is_causal=causal, scale=scale)], dim=-1)
    return combine_outputs(o1, o2, lam, q.dtype, norm_weight, norm_eps, out_scale)


class Compiled:
    """`torch.compile(fn, dynamic=False)` with a backend that counts: `graphs` compiled and `runs` of compiled
    graphs (forward graphs; a call that Dynamo sends to eager code does not count). Inductor on CUDA; aot_eager on
    CPU, where the benchmark is a smoke run and Inductor's C++ build would take minutes."""

    def __init__(self, fn, fullgraph: bool = False):
        self.graphs = 0
        self.runs = 0
        inner = torch._dynamo.lookup_backend("inductor" if torch.cuda.is_available() else "aot_eager")

        def backend(gm, example_inputs):
            self.graphs += 1
            compiled = inner(gm, example_inputs)

            def run(*args):
                self.runs += 1
                return compiled(*args)

            return run

        self._fn = torch.compile(fn, dynamic=False, fullgraph=fullgraph, backend=backend)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


def _compile_setup():
    # The bwd-only timing replays one graph's backward (retain_graph=True), which donated buffers forbid.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False


# Compiled providers: name -> the eager function they compile.
COMPILED = {"compile": diff_attn_reference, "sdpa2-compile": sdpa_diff_attn, "sdpa4-compile": sdpa4_diff_attn}
# Providers that are `diff_attn` under other environment settings (read by the kernels per call), for backward modes.
PROVIDER_ENV = {"triton-bwd-fused": {"DIFF_ATTN_BWD": "fused"}, "triton-bwd-atomic": {"DIFF_ATTN_BWD": "atomic"}}
PROVIDERS = {
    "triton": diff_attn,
    **{name: diff_attn for name in PROVIDER_ENV},
    "eager": diff_attn_reference,
    "eager-official": diff_attn_official,
    "sdpa2": sdpa_diff_attn,
    "sdpa2-fp32": sdpa2_fp32_diff_attn,
    "sdpa4": sdpa4_diff_attn,
    **COMPILED,
}


def fresh(name: str):
    """The callable for one benchmark case: a new `Compiled` for compiled providers (Dynamo's caches reset, so no
    case inherits another's graphs or recompile count), the plain function otherwise."""
    if name not in COMPILED:
        return PROVIDERS[name]
    _compile_setup()
    torch._dynamo.reset()
    return Compiled(COMPILED[name])


def skip_reason(name: str, device: torch.device) -> str | None:
    """Why provider `name` cannot run here, or None."""
    if name not in PROVIDERS:
        return f"unknown provider {name!r}"
    if name == "triton" or name in PROVIDER_ENV:
        return triton_unavailable_reason(device)
    if name in COMPILED:
        try:
            import torch._dynamo  # noqa: F401
        except Exception as e:  # pragma: no cover
            return f"torch.compile unavailable: {e}"
    return None
