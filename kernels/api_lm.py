"""Public entry points of the language-model forms: `diff_attn_varlen` (forward and backward) and
`diff_attn_decode` (forward). Validate, then launch; Triton is imported only when a kernel is called.

Like `kernels.diff_attn`, both work under torch.compile(fullgraph=True): traced calls (torch.compile, export,
make_fx, fake tensors) go through the torch.library ops of kernels/ops_lm.py, eager calls through the same
functions without the op dispatch (less host time, the same bits).
"""

from __future__ import annotations

import torch

from .api import _traced
from .runtime import require_triton
from .validate_lm import check_decode_args, check_varlen_args


def diff_attn_varlen(q, k, v, lam, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                     scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    """Differential attention over packed variable-length sequences (FlashAttention's varlen convention), GQA-native.

    Args:
        q: (total_q, 2H, d); diff-head h pairs query heads 2h and 2h+1.
        k: (total_k, 2Hkv, d), v: (total_k, Hkv, 2d), H % Hkv == 0: diff-head h reads key heads 2g, 2g+1 and
            value head g = h // (H / Hkv) in place (no repeat). Last dim contiguous; other strides free.
        lam: a number, 0-d tensor, (H,) tensor, or a tensor broadcastable to (total_q, H) (per token, packed
            like q). A tensor λ that requires grad gets a gradient of its own shape.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 cumulative lengths on q's device; sequence b is
            q[cu_q[b]:cu_q[b+1]] against k/v[cu_k[b]:cu_k[b+1]]. Zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: Python ints >= every length (they size the grids). On CUDA the contents of
            cu_seqlens and these bounds are not checked (it would cost a host sync; see kernels/validate_lm.py).
        causal: query i of a sequence sees keys j <= i + Lk - Lq (bottom-right, as FlashAttention >= 2.1); a
            query that sees no key outputs 0.
        scale, norm_weight, norm_eps, out_scale: as `kernels.diff_attn`.

    Returns:
        (total_q, H, 2d) in q's dtype. Differentiable in q, k, v, λ (tensor) and norm_weight, once (a second
        derivative raises a RuntimeError naming `kernels.diff_attn_varlen_reference`); dK and dV are summed over
        each group's diff-heads by one program per key block (deterministic, no atomics). Works under
        torch.compile(fullgraph=True), forward and backward (kernels/ops_lm.py).
    """
    args = check_varlen_args(q, k, v, lam, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                             scale=scale, norm_weight=norm_weight, norm_eps=norm_eps, out_scale=out_scale,
                             for_kernel=True)
    require_triton(q.device)
    from . import ops_lm  # registers the torch.ops.diffattn LM ops; imports Triton

    call = (q, k, v, args.lam, norm_weight, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            args.scale, float(norm_eps), float(out_scale))
    leaves = (q, k, v, args.lam) + ((norm_weight,) if norm_weight is not None else ())
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    if _traced(leaves + (cu_seqlens_q, cu_seqlens_k)):
        return (torch.ops.diffattn.diff_attn_varlen(*call)[0] if grad
                else torch.ops.diffattn.diff_attn_varlen_inference(*call))
    return ops_lm.VarlenFunction.apply(*call) if grad else ops_lm.eager_varlen_inference(*call)


def diff_attn_decode(q, k_cache, v_cache, lam, *, cache_seqlens, cache_leftpad=None, head_layout="interleaved",
                     scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0, num_splits=None):
    """Differential attention of a few new queries against a KV cache (FlashDecoding), GQA-native; forward only.

    Args:
        q: (B, 2H, Nq, d), the last Nq positions of each sequence (Nq small: 1 for greedy decoding).
        k_cache: (B, 2Hkv, Nmax, d); v_cache: (B, Hkv, Nmax, 2d) (interleaved) or (B, 2Hkv, Nmax, d) (halves);
            H % Hkv == 0; read in place (last dim contiguous, other strides free: a slice of a larger cache is fine).
        lam: a number, 0-d tensor, (H,) tensor or a tensor broadcastable to (B, H, Nq).
        cache_seqlens: (B,) int32 on q's device, the end of sequence b's valid cache entries, the new queries' own
            keys included (Nq <= cache_seqlens[b] <= Nmax). Query i sits at position cache_seqlens[b] - Nq + i and
            sees the valid keys up to it (causal).
        cache_leftpad: None or (B,) int32 on q's device (flash_attn_with_kvcache's convention): sequence b's valid
            keys start there, [cache_leftpad[b], cache_seqlens[b]); the entries before it (the left padding of a
            Hugging Face batch) are never read. 0 <= cache_leftpad[b] <= cache_seqlens[b]: a new query whose
            position lies before cache_leftpad[b] (a pad among the new tokens) sees no key and outputs 0. The
            contents of cache_seqlens and cache_leftpad are checked on CPU only (on CUDA it would cost a host sync;
            see kernels/validate_lm.py).
        head_layout: which heads form a pair (no copy either way; the kernel reads them through strides):
            "interleaved": diff-head h = query heads 2h, 2h+1; group g = key heads 2g, 2g+1 and value head g
                of width 2d.
            "halves" (transformers' DiffLlama): diff-head h = query heads h, h+H; group g = key heads g, g+Hkv;
                v_cache (B, 2Hkv, Nmax, d), group g's value is cat(v_cache[:, g], v_cache[:, g+Hkv], -1).
            Diff-head h uses group h // (H / Hkv) in both layouts.
        scale, norm_weight, norm_eps, out_scale: as `kernels.diff_attn`.
        num_splits: split the key length into this many chunks per (sequence, group) (FlashDecoding); None picks
            enough to fill the GPU. The partial results are merged exactly (log-sum-exp), so any value gives the
            same result up to fp32 rounding.

    Returns:
        (B, H, Nq, 2d) in q's dtype (a transposed view of a (B, Nq, H, 2d) buffer). No autograd. Works under
        torch.compile(fullgraph=True) (kernels/ops_lm.py).
    """
    args = check_decode_args(q, k_cache, v_cache, lam, cache_seqlens, scale=scale, norm_weight=norm_weight,
                             norm_eps=norm_eps, out_scale=out_scale, for_kernel=True, cache_leftpad=cache_leftpad,
                             head_layout=head_layout)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    require_triton(q.device)
    from . import ops_lm  # registers the torch.ops.diffattn LM ops; imports Triton

    tensors = (q, k_cache, v_cache, args.lam, cache_seqlens) + tuple(
        t for t in (norm_weight, cache_leftpad) if t is not None)
    if _traced(tensors):
        return torch.ops.diffattn.diff_attn_decode(q, k_cache, v_cache, args.lam, norm_weight, cache_seqlens,
                                                   cache_leftpad, head_layout, args.scale, float(norm_eps),
                                                   float(out_scale), num_splits)
    return ops_lm.decode_fwd(q, k_cache, v_cache, args.lam, norm_weight, cache_seqlens, scale=args.scale,
                             norm_eps=float(norm_eps), out_scale=float(out_scale), num_splits=num_splits,
                             cache_leftpad=cache_leftpad, head_layout=head_layout)
