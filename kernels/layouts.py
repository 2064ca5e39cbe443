"""The head layouts of `kernels.diff_attn` (validate.HEAD_LAYOUTS) as the strides the kernels take.

The kernels never copy or repeat K/V: every layout is a set of strides over the caller's tensors.
- q, k (and dq, dk): (batch, per-diff-head or per-group, pair offset, row, feature). Map 1 of diff-head h (group g)
  starts at h·stride_h (g·stride_h); map 2 one pair offset further.
      interleaved  heads 2h, 2h+1:   stride_h = 2·stride(1), pair offset = stride(1)
      halves       heads h, h+H:     stride_h = stride(1),   pair offset = H·stride(1) (Hkv·stride(1) for k)
      v2 (k only)  one key head g:   stride_h = stride(1),   pair offset 0 (the kernels load it once: SHARED_K)
- v (and dv): (batch, per-group, split offset, row, feature). Column c of group g's value row (c < V_WIDTH) lives
  at (c mod d)·stride_d + (c div d)·split: interleaved split = d·stride_d (the 2d-wide head itself), halves split =
  Hkv·stride(1) (value heads g and g+Hkv), v2 has one d-wide half (split unused, 0).
Pair and split offsets are scalar kernel arguments (i64 when they pass 2^31); validate.MAX_SPLIT_OFFSET bounds the
split, the one that is part of a 32-bit in-tile offset.
"""

from __future__ import annotations

import torch


def kv_heads(k: torch.Tensor, head_layout: str) -> int:
    """Key/value groups Hkv of a (validated) k."""
    return k.shape[1] if head_layout == "v2" else k.shape[1] // 2


def value_width(head_dim: int, head_layout: str) -> int:
    """Width of a diff-head's value and output rows (the kernels' V_WIDTH)."""
    return head_dim if head_layout == "v2" else 2 * head_dim


def pair_strides(x: torch.Tensor, head_layout: str, pairs: int, *, key: bool = False) -> tuple:
    """(batch, per-pair, pair offset, row, feature) strides of q/dq (pairs = H) or k/dk (pairs = Hkv, key=True)."""
    s0, s1, s2, s3 = x.stride()
    if head_layout == "halves":
        return s0, s1, pairs * s1, s2, s3
    if head_layout == "v2" and key:
        return s0, s1, 0, s2, s3
    return s0, 2 * s1, s1, s2, s3


def value_strides(v: torch.Tensor, head_layout: str, groups: int) -> tuple:
    """(batch, per-group, split offset, row, feature) strides of v/dv."""
    s0, s1, s2, s3 = v.stride()
    if head_layout == "interleaved":
        return s0, s1, (v.shape[-1] // 2) * s3, s2, s3
    return s0, s1, (groups * s1 if head_layout == "halves" else 0), s2, s3
