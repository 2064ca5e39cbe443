"""Plain PyTorch references for the language-model forms of differential attention: GQA/MQA, packed variable-length
batches (FlashAttention's varlen convention), KV-cache decoding and the Diff Transformer V2 layout.

All run any float dtype (float64 for the tests' ground truth) on any device, and materialise the attention maps.
They share one core, `diff_attn_core`, with the dense reference's dtype handling (kernels/reference.py): scores and
the product with V in the input dtype, softmax and the λ-difference in fp32 (fp64 for fp64 inputs), the RMS-norm
epilogue from `reference.rms_norm_epilogue`.

Causal masks are aligned bottom-right (FlashAttention >= 2.1): with Lq queries and Lk keys, query i sees keys
j <= i + Lk - Lq. A query that sees no key (Lk < Lq, or Lk = 0) outputs 0, as FlashAttention's does.
"""

from __future__ import annotations

import torch

from .reference import expand_heads, rms_norm_epilogue
from .validate_lm import check_decode_args, check_varlen_args, lam_per_token


def diff_attn_core(q, k, v, lam, *, causal, scale, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    """q (B, 2H, Nq, d); k (B, 2H, Nk, d) and v (B, H, Nk, 2d) already per query head; lam broadcastable to
    (B, H, Nq) in the accumulation dtype. Returns (B, H, Nq, 2d) in q's dtype."""
    B, H2, Nq, _ = q.shape
    H, Nk = H2 // 2, k.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale  # (B, 2H, Nq, Nk)
    if causal:
        keep = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(diagonal=Nk - Nq)
        scores = scores.masked_fill(~keep, float("-inf"))
        seen = keep.any(dim=-1)[:, None]  # (Nq, 1): rows with at least one visible key
        probs = torch.where(seen, torch.softmax(scores, dim=-1), 0.0)  # all-masked rows: 0, not NaN
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = probs.view(B, H, 2, Nq, Nk)
    attn = probs[:, :, 0] - lam.to(acc)[..., None] * probs[:, :, 1]
    out = torch.matmul(attn.to(q.dtype), v)  # Nk = 0: an empty sum, zeros
    if norm_weight is not None:
        out = rms_norm_epilogue(out, norm_weight, norm_eps, out_scale)
    elif out_scale != 1.0:
        out = (out.to(acc) * out_scale).to(q.dtype)
    return out


def expand_kv(k, v, heads: int):
    """GQA: key heads (B, 2Hkv, N, d) and value heads (B, Hkv, N, 2d) repeated for `heads` diff-heads, so that
    diff-head h uses group h // (heads / Hkv): both of its maps read that group's pair (2g, 2g+1)."""
    return expand_heads(None, k, v, heads)[1:]


def diff_attn_gqa_reference(q, k, v, lam, *, causal=False, scale=None, norm_weight=None, norm_eps=1e-5,
                            out_scale=1.0):
    """Dense GQA/MQA: q (B, 2H, Nq, d), k (B, 2Hkv, Nk, d), v (B, Hkv, Nk, 2d), H % Hkv == 0; Nq may differ from
    Nk (causal bottom-right). λ: a number, 0-d, (H,) or broadcastable to (B, H, Nq)."""
    B, H2, Nq, d = q.shape
    H = H2 // 2
    if H % (k.shape[1] // 2) != 0:
        raise ValueError(f"q's {H} diff-heads must be a multiple of k's {k.shape[1] // 2} key/value groups")
    acc = torch.promote_types(q.dtype, torch.float32)
    lam3 = _lam3(lam, B, H, Nq, acc, q.device)
    k, v = expand_kv(k, v, H)
    return diff_attn_core(q, k, v, lam3, causal=causal, scale=d**-0.5 if scale is None else scale,
                          norm_weight=norm_weight, norm_eps=norm_eps, out_scale=out_scale)


def _lam3(lam, B, H, N, dtype, device):
    if not isinstance(lam, torch.Tensor):
        return torch.full((1, 1, 1), float(lam), dtype=dtype, device=device)
    if lam.dim() == 1:
        return lam.to(dtype).view(1, -1, 1)
    return lam.to(dtype).reshape((1,) * (3 - lam.dim()) + tuple(lam.shape)) if lam.dim() < 3 else lam.to(dtype)


def diff_attn_varlen_reference(q, k, v, lam, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                               causal=False, scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0):
    """`kernels.diff_attn_varlen`, one sequence at a time: q (total_q, 2H, d), k (total_k, 2Hkv, d),
    v (total_k, Hkv, 2d) -> (total_q, H, 2d). Same validation as the kernel (less its dtype/head-dim limits)."""
    args = check_varlen_args(q, k, v, lam, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                             scale=scale, norm_weight=norm_weight, norm_eps=norm_eps, out_scale=out_scale,
                             for_kernel=False)
    acc = torch.promote_types(q.dtype, torch.float32)
    lam_th = lam_per_token(args.lam, q.shape[0], args.heads).to(acc)  # (total_q, H)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = q.new_zeros(q.shape[0], args.heads, 2 * q.shape[-1])
    pieces = []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].transpose(0, 1)[None]  # (1, 2H, Lq, d)
        ks = k[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        vs = v[ck[b]:ck[b + 1]].transpose(0, 1)[None]
        ks, vs = expand_kv(ks, vs, args.heads)
        lam_b = lam_th[cq[b]:cq[b + 1]].transpose(0, 1)[None]  # (1, H, Lq)
        o = diff_attn_core(qs, ks, vs, lam_b, causal=causal, scale=args.scale, norm_weight=norm_weight,
                           norm_eps=norm_eps, out_scale=out_scale)
        pieces.append(o[0].transpose(0, 1))  # (Lq, H, 2d)
    return torch.cat(pieces, dim=0) if pieces else out


def halves_to_interleaved(q, k_cache, v_cache):
    """Decode's head_layout="halves" (transformers' DiffLlama: diff-head h = query heads h and h + H, group g = key
    heads g and g + Hkv, value cat(v[:, g], v[:, g + Hkv], -1)) rewritten as the interleaved layout: q (B, 2H, Nq, d)
    with pairs (2h, 2h+1), k (B, 2Hkv, Nmax, d) with pairs (2g, 2g+1), v (B, Hkv, Nmax, 2d). Copies."""
    def interleave(x):
        B, n2, N, d = x.shape
        return x.view(B, 2, n2 // 2, N, d).transpose(1, 2).reshape(B, n2, N, d)

    Hkv = v_cache.shape[1] // 2
    return interleave(q), interleave(k_cache), torch.cat([v_cache[:, :Hkv], v_cache[:, Hkv:]], dim=-1)


def diff_attn_decode_reference(q, k_cache, v_cache, lam, *, cache_seqlens, cache_leftpad=None,
                               head_layout="interleaved", scale=None, norm_weight=None, norm_eps=1e-5,
                               out_scale=1.0):
    """`kernels.diff_attn_decode`: q (B, 2H, Nq, d) are the last Nq positions of each sequence; sequence b's valid
    cache entries are [cache_leftpad[b], cache_seqlens[b]) (the new tokens' keys included; leftpad 0 when None);
    causal: query i at position cache_seqlens[b] - Nq + i sees the valid keys up to it (none: it outputs 0).
    head_layout "halves" is converted with `halves_to_interleaved`. Returns (B, H, Nq, 2d)."""
    args = check_decode_args(q, k_cache, v_cache, lam, cache_seqlens, scale=scale, norm_weight=norm_weight,
                             norm_eps=norm_eps, out_scale=out_scale, for_kernel=False, cache_leftpad=cache_leftpad,
                             head_layout=head_layout)
    if head_layout == "halves":
        q, k_cache, v_cache = halves_to_interleaved(q, k_cache, v_cache)
    lens = cache_seqlens.tolist()
    pads = cache_leftpad.tolist() if cache_leftpad is not None else [0] * len(lens)
    outs = []
    for b, (p, n) in enumerate(zip(pads, lens)):
        # Keys [p, n): the core's bottom-right causal alignment puts query i at key index n - p - Nq + i of the
        # slice, i.e. at cache position n - Nq + i.
        ks, vs = expand_kv(k_cache[b:b + 1, :, p:n], v_cache[b:b + 1, :, p:n], args.heads)
        lam_b = args.lam[b:b + 1] if args.lam.shape[0] > 1 else args.lam
        outs.append(diff_attn_core(q[b:b + 1], ks, vs, lam_b, causal=True, scale=args.scale,
                                   norm_weight=norm_weight, norm_eps=norm_eps, out_scale=out_scale))
    return torch.cat(outs, dim=0)


def diff_attn_v2_reference(q, k, v, lam, *, causal=True, scale=None):
    """Diff Transformer V2 layout: both maps of a pair share one key and one value head.

    q (B, 2H, N, d): query heads 2h and 2h+1 form diff-head h; k, v (B, Hkv, N, d), diff-head h reads key/value
    head h // (H / Hkv); λ per token, broadcastable to (B, H, N) (typically sigmoid of a projection of the
    token); no per-head norm, no (1 − λ_init) factor. Returns (B, H, N, d):
        softmax(s·Q[2h]Kᵀ)V − λ·softmax(s·Q[2h+1]Kᵀ)V.
    On the V1 layout this is k1 = k2 = K[g] (the same key head for both maps) and a value of width d.
    """
    B, H2, N, d = q.shape
    H = H2 // 2
    _, k2, v2 = expand_heads(None, k, v, H, "v2")  # each query head of the pair reads its group's one key head
    acc = torch.promote_types(q.dtype, torch.float32)
    return diff_attn_core(q, k2, v2, _lam3(lam, B, H, N, acc, q.device), causal=causal,
                          scale=d**-0.5 if scale is None else scale)
