"""Plain PyTorch differential attention: the eager backend of the model, the benchmarks' baseline, and (evaluated in
float64) the ground truth of the tests.

It materialises both (N, N) attention maps, as the official DiffCLIP / Diff-Transformer code does.
"""

from __future__ import annotations

from typing import Callable

import torch

from .validate import check_diff_attn_args


def rms_norm_epilogue(o: torch.Tensor, norm_weight: torch.Tensor, norm_eps: float, out_scale: float) -> torch.Tensor:
    """DiffCLIP's per-head RMS norm over the last dim (2d), in fp32 (fp64 for fp64 input), times out_scale."""
    acc = torch.promote_types(o.dtype, torch.float32)
    of = o.to(acc)
    rstd = torch.rsqrt(of.pow(2).mean(dim=-1, keepdim=True) + norm_eps)
    return (of * rstd * norm_weight.to(acc) * out_scale).to(o.dtype)


def expand_heads(q, k, v, heads: int, head_layout: str = "interleaved"):
    """q, k, v of any head layout (kernels/validate.py: HEAD_LAYOUTS) rearranged into today's interleaved layout with
    one key/value group per diff-head: q, k (B, 2H, N, d) with diff-head h at heads 2h, 2h+1, v (B, H, N, width).
    Indexing, stacks and repeats only (differentiable; gradients flow back to the caller's layout): every reference
    then runs the one attention formula on this form. `q` may be None (only "halves" moves query heads)."""
    if head_layout == "halves":  # diff-head h: query heads h, h+H; group g: key heads g, g+Hkv, value cat(v[g], v[g+Hkv])
        if q is not None:
            q = torch.stack((q[:, :heads], q[:, heads:]), dim=2).flatten(1, 2)
        hkv = k.shape[1] // 2
        k = torch.stack((k[:, :hkv], k[:, hkv:]), dim=2).flatten(1, 2)
        v = torch.cat((v[:, :hkv], v[:, hkv:]), dim=-1)
    elif head_layout == "v2":  # both maps of group g read key head g (and the one d-wide value head g)
        k = k.repeat_interleave(2, dim=1)
    group = heads // v.shape[1]
    if group > 1:  # GQA: diff-head h reads group h // group
        k = k.unflatten(1, (-1, 2)).repeat_interleave(group, dim=1).flatten(1, 2)
        v = v.repeat_interleave(group, dim=1)
    return q, k, v


def diff_attn_reference(
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
    attn_hook: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Differential attention in eager PyTorch; same signature and semantics as `kernels.diff_attn`.

    Default layout: q, k: (B, 2H, N, d); v: (B, H, N, 2d) -> (B, H, N, 2d) in the input dtype. Diff-head h pairs
    heads 2h, 2h+1: ``softmax(s·Q[2h]K[2h]ᵀ + M)V[h] − λ·softmax(s·Q[2h+1]K[2h+1]ᵀ + M)V[h]``, then optionally
    ``o·rsqrt(mean(o²) + norm_eps)·norm_weight·out_scale``. GQA (k, v with Hkv < H groups) and the other head
    layouts (`head_layout`, see `kernels.diff_attn`) are first rearranged into that form by `expand_heads`.

    Scores and the final product with V run in the input dtype (as eager model code does); softmax, the
    λ-difference and the norm run in fp32 (fp64 for fp64 inputs). Runs on any device, any float dtype, any d.

    `attn_hook` (this function only, not the kernel): called with the combined map ``A = P1 − λ·P2`` (B, H, N, N)
    in fp32 (fp64 for fp64 inputs), the very tensor that then multiplies V, before the norm epilogue and
    out_scale. It is part of the autograd graph, so gradients with respect to it can be taken
    (`diffclip.explain` does); the hook must not modify it.
    """
    args = check_diff_attn_args(
        q, k, v, lam, causal=causal, scale=scale, norm_weight=norm_weight, norm_eps=norm_eps,
        out_scale=out_scale, for_kernel=False, head_layout=head_layout,
    )
    B, H, N = args.batch, args.heads, args.seqlen
    q, k, v = expand_heads(q, k, v, H, args.head_layout)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * args.scale  # (B, 2H, N, N)
    if causal:
        keep = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(B, H, 2, N, N)
    attn = probs[:, :, 0] - args.lam.to(acc)[..., None] * probs[:, :, 1]  # (B, H, N, N), fp32
    if attn_hook is not None:
        attn_hook(attn)
    out = torch.matmul(attn.to(q.dtype), v)  # (B, H, N, 2d), or (B, H, N, d) for v2
    if norm_weight is not None:
        out = rms_norm_epilogue(out, norm_weight, norm_eps, out_scale)
    elif out_scale != 1.0:
        out = (out.to(acc) * out_scale).to(q.dtype)
    return out


def diff_attn_official(q, k, v, lam, *, causal=False, scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    """The official Diff-Transformer code's dtype handling (microsoft/unilm, Diff-Transformer/multihead_diffattn.py,
    which DiffCLIP's official code follows), on this module's layout: q scaled in the input dtype before QKᵀ,
    scores in the input dtype, `nan_to_num`, softmax in fp32 cast back, λ cast to the input dtype and the
    difference P1 − λP2 taken in it, one product with V, then the RMS norm in fp32 cast back, times the weight and
    out_scale in the input dtype. A baseline for speed and accuracy comparisons (benchmarks' `eager-official`,
    tests/kernels/test_accuracy.py), not a reference: `diff_attn_reference` is the exact one."""
    args = check_diff_attn_args(
        q, k, v, lam, causal=causal, scale=scale, norm_weight=norm_weight, norm_eps=norm_eps,
        out_scale=out_scale, for_kernel=False,
    )
    B, H, N = args.batch, args.heads, args.seqlen
    q, k, v = expand_heads(q, k, v, H)  # GQA: each diff-head's group
    scores = torch.nan_to_num(torch.matmul(q * args.scale, k.transpose(-1, -2)))
    if causal:
        scores = scores.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores).view(B, H, 2, N, N)
    attn = probs[:, :, 0] - args.lam.to(q.dtype)[..., None] * probs[:, :, 1]
    out = torch.matmul(attn, v)
    if norm_weight is not None:
        of = out.float() if out.dtype != torch.float64 else out
        out = (of * torch.rsqrt(of.pow(2).mean(dim=-1, keepdim=True) + norm_eps)).type_as(out)
        out = out * norm_weight.to(out.dtype)
    return out * out_scale if out_scale != 1.0 else out
