"""Inner steps shared by the language-model kernel families (varlen in `varlen.py` / `varlen_bwd.py`, decode in
`decode.py`): folding key blocks into both online-softmax states with a per-row causal limit, and the
λ-difference + RMS-norm epilogue.

The per-key-block softmax update itself is the dense forward's `_online_softmax_step` (fwd.py), imported, not
copied: the attention math has one copy. What differs from the dense inner loop (`fwd._fwd_inner`) is the causal
test: here each query row carries the index of the last key it may see (`q_last`), which expresses FlashAttention's
bottom-right alignment (query i of a sequence with Lq queries and Lk keys sees keys j <= i + Lk - Lq) and decoding
(the Nq new queries are the last Nq positions of the cache) with one mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import _online_softmax_step


@triton.jit
def _fold_keys(
    acc1, acc2, m1, m2, l1, l2, q1, q2,
    k1_base, k2_base, v_base, k_tile, v_tile, stride_kn, stride_vn,
    q_last, lo, hi, n_keys, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold key blocks [lo, hi) (relative to the bases) into both maps' states; K1, K2 and V tiles load once.

    MASKED=False: every key of the range exists (< n_keys) and is visible to every row, so no mask is built.
    MASKED=True: keys >= n_keys read zeros and are masked (they belong to the next sequence or lie past the
    cache's valid length), and with CAUSAL key j is visible to row r only when j <= q_last[r].
    Addresses: a 64-bit scalar block start plus the int32 in-tile offsets k_tile / v_tile.
    """
    for start_n in range(lo, hi, BLOCK_N):
        row = tl.cast(start_n, tl.int64)  # a plain int under the interpreter
        k1_ptrs = k1_base + row * stride_kn + k_tile
        k2_ptrs = k2_base + row * stride_kn + k_tile
        v_ptrs = v_base + row * stride_vn + v_tile
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_seq = offs_n < n_keys
            k1 = tl.load(k1_ptrs, mask=in_seq[:, None], other=0.0)
            k2 = tl.load(k2_ptrs, mask=in_seq[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)
            visible = in_seq[None, :]
            if CAUSAL:
                visible = visible & (q_last[:, None] >= offs_n[None, :])
        else:
            k1 = tl.load(k1_ptrs)
            k2 = tl.load(k2_ptrs)
            v = tl.load(v_ptrs)
            visible = 0  # unused when not MASKED
        acc1, m1, l1 = _online_softmax_step(acc1, m1, l1, q1, k1, v, visible, qk_scale, MASKED, DOT_PRECISION)
        acc2, m2, l2 = _online_softmax_step(acc2, m2, l2, q2, k2, v, visible, qk_scale, MASKED, DOT_PRECISION)
    return acc1, acc2, m1, m2, l1, l2


@triton.jit
def _unmasked_end(start, end, first_last, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """End of the mask-free key blocks of [start, end): whole blocks below `end` and, with CAUSAL, wholly visible
    to the block's first row (keys <= first_last). Always in [start, end]."""
    stop = end
    if CAUSAL:
        stop = tl.minimum(stop, first_last + 1)
    return start + (tl.maximum(stop - start, 0) // BLOCK_N) * BLOCK_N


@triton.jit
def _norm_epilogue(o, NORM_W, stride_w, norm_eps, out_scale, HAS_NORM: tl.constexpr, WIDTH: tl.constexpr):
    """o·rsqrt(mean(o²) + eps)·w·out_scale per row (fp32), or o·out_scale without the norm: the dense op's
    epilogue. A row of zeros (no visible key) stays zero."""
    if HAS_NORM:
        rstd = tl.math.rsqrt(tl.sum(o * o, 1) / WIDTH + norm_eps)
        w = tl.load(NORM_W + tl.arange(0, WIDTH) * stride_w).to(tl.float32)
        o = o * rstd[:, None] * (w * out_scale)[None, :]
    else:
        o = o * out_scale
    return o


@triton.jit
def _finish_maps(acc1, acc2, m1, m2, l1, l2):
    """Normalised O1, O2 and both log-sum-exps (log2 domain, m + log2 l). A row that saw no key has l = 0: its O is
    0 (not 0/0) and its lse is -inf here (callers that save it for the backward turn that into +inf)."""
    has1 = l1 > 0
    has2 = l2 > 0
    o1 = acc1 * (1.0 / tl.where(has1, l1, 1.0))[:, None]
    o2 = acc2 * (1.0 / tl.where(has2, l2, 1.0))[:, None]
    lse1 = tl.where(has1, m1 + tl.math.log2(tl.where(has1, l1, 1.0)), float("-inf"))
    lse2 = tl.where(has2, m2 + tl.math.log2(tl.where(has2, l2, 1.0)), float("-inf"))
    return o1, o2, lse1, lse2
