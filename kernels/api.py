"""`diff_attn`: the public entry point of the fused kernel. Validates, then hands over to the autograd op.

Triton is imported only when the kernel is actually called, so `import kernels` works without it.
"""

from __future__ import annotations

import torch

from .runtime import require_triton
from .validate import check_diff_attn_args


def diff_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lam,
    *,
    causal: bool = False,
    scale: float | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    out_scale: float = 1.0,
    head_layout: str = "interleaved",
) -> torch.Tensor:
    """Fused differential attention (Triton): one tiled pass over K1, K2 and V.

    Args:
        q: (B, 2H, N, d): H diff-heads, two query heads each (which two: `head_layout`). Any strides (e.g.
            ``x.view(B, N, 2H, d).transpose(1, 2)`` straight from a linear layer). d in {16, 32, 64, 128}; fp16,
            bf16 or fp32.
        k: (B, 2Hkv, N, d) (v2: (B, Hkv, N, d)), same dtype and device. GQA/MQA: Hkv key/value groups with
            H % Hkv == 0; diff-head h reads group h // (H / Hkv). Hkv == H is plain multi-head attention.
        v: the groups' values, (B, Hkv, N, 2d) (halves and v2 layouts: k's shape). K and V are read in place,
            never repeated per diff-head.
        lam: λ, a Python number, a 0-d tensor (per layer), an (H,) tensor (per head) or a (B, H, N) tensor (per
            query token); any shape broadcastable to (B, H, N) works. Read in fp32 on the device (no host sync).
            A tensor λ that requires grad receives a gradient of its own shape. λ = 0 is fine. A non-finite
            Python λ is rejected; a non-finite CUDA tensor λ is not checked (that would sync) and gives
            non-finite outputs.
        causal: mask keys after each query (fully masked key blocks are skipped).
        scale: softmax scale s, default d**-0.5.
        norm_weight: (w,) weight of the fused RMS-norm epilogue (DiffCLIP's ``diff_norm``; w = 2d, d for v2); None
            skips it.
        norm_eps: epsilon of that norm.
        out_scale: multiplies the output (DiffCLIP: 1 - λ_init).
        head_layout: where diff-head h's heads live (g = h // (H / Hkv) its group):
            "interleaved" (DiffCLIP, Diff-Transformer V1): query heads 2h, 2h+1; key heads 2g, 2g+1; value head
                g, (B, Hkv, N, 2d).
            "halves" (transformers' DiffLlama): query heads h and h+H; key heads g and g+Hkv; v (B, 2Hkv, N, d),
                group g's 2d-wide value is ``cat(v[:, g], v[:, g + Hkv], -1)``.
            "v2" (Diff Transformer V2): query heads 2h, 2h+1; both maps read key head g and the d-wide value head
                g of k, v (B, Hkv, N, d); output and norm weight are d wide.

    Returns:
        (B, H, N, w) in the input dtype (w = 2d; d for "v2"), ``softmax(s·Q1K1ᵀ)V − λ·softmax(s·Q2K2ᵀ)V`` per
        diff-head, then ``o·rsqrt(mean(o²) + norm_eps)·norm_weight`` when `norm_weight` is given, times
        `out_scale`. The result is a transposed view of a (B, N, H, w) buffer, so
        ``out.transpose(1, 2).reshape(B, N, H * w)`` is free.

    Differentiable in q, k, v, λ (tensor) and norm_weight, once (dk, dv: summed over each group's diff-heads,
    deterministically): differentiating the gradients again (after
    ``create_graph=True``: gradient penalties, R1, Hessian terms) raises a RuntimeError that names
    ``kernels.diff_attn_reference``, which is twice differentiable. Under ``torch.autocast`` q, k and v are cast to the
    autocast dtype. Works under ``torch.compile(fullgraph=True)``: traced calls use the `torch.library` ops, eager
    calls a plain autograd.Function over the same functions (less host time; see `kernels/ops.py`).

    Raises:
        TypeError / ValueError: bad arguments (named in the message).
        RuntimeError: Triton missing, or tensors on a device the kernel cannot run on (CPU needs
            ``TRITON_INTERPRET=1``; or use ``kernels.diff_attn_reference``).
    """
    q, k, v = _autocast(q, k, v)
    args = check_diff_attn_args(
        q, k, v, lam, causal=causal, scale=scale, norm_weight=norm_weight, norm_eps=norm_eps,
        out_scale=out_scale, for_kernel=True, head_layout=head_layout,
    )
    require_triton(q.device)
    if args.batch == 0 or args.seqlen == 0 or args.heads == 0:  # (B, H, N, w), a zero-sized dim: nothing to compute
        # (H = 0 must not launch: the backward's group count would be 0 and its programs divide by it)
        return v.new_empty(args.batch, args.heads, args.seqlen, args.value_width)
    from . import ops  # noqa: F401  (registers the torch.ops.diffattn ops; imports Triton)

    call = (q, k, v, args.lam, norm_weight, causal, args.scale, float(norm_eps), float(out_scale), head_layout)
    leaves = (q, k, v, args.lam) + ((norm_weight,) if norm_weight is not None else ())
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    if _traced(leaves):  # torch.compile / export / make_fx / fake tensors: the torch.library ops
        return torch.ops.diffattn.diff_attn(*call)[0] if grad else torch.ops.diffattn.diff_attn_inference(*call)
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in leaves):
        raise RuntimeError("kernels.diff_attn does not support torch.func transforms (grad, vmap, vjp, jacrev, ...): "
                           "its Triton kernels need plain tensors; use torch.autograd (loss.backward()) instead")
    # Eager: the same forward/backward without the op dispatch (a third of the host time; see kernels/ops.py).
    # No gradient: the forward writes no backward state (also for trainable weights under torch.no_grad()).
    return ops.DiffAttnFunction.apply(*call) if grad else ops.eager_inference(*call)


def _traced(tensors) -> bool:
    """True while the call is being traced rather than run: under torch.compile/export, a dispatch mode (make_fx,
    FakeTensorMode) or with tensor subclasses (fake, functional) — where only the registered ops can go."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True
    return any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors)


def _autocast(q, k, v):
    """Under torch.autocast, q/k/v compute in the autocast dtype (fp16/bf16), as SDPA does; λ and the norm weight
    are read in fp32 regardless."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return q, k, v  # check_diff_attn_args names the culprit
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if t.is_floating_point() else t for t in (q, k, v))
    return q, k, v
