"""Argument checking of `diff_attn_varlen` and `diff_attn_decode` (and their references).

Every bad input gets a TypeError/ValueError naming the argument before anything launches. The contents of the
integer length tensors (cu_seqlens_*, cache_seqlens, cache_leftpad) are checked only when they live on the CPU (the
interpreter, the references) and the call is not being traced: on CUDA reading them would synchronise the host with
the GPU on every call, which serving loops and CUDA graphs cannot afford, and under torch.compile/export they have no
values yet. What is then NOT checked on CUDA: cu_seqlens starting at 0, being non-decreasing and
ending at the totals; max_seqlen_* >= every actual length (a smaller value leaves the rows past it unwritten);
Nq <= cache_seqlens[b] <= Nmax and 0 <= cache_leftpad[b] <= cache_seqlens[b]. Their dtype, shape and device are
always checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .api import _traced
from .validate import (KERNEL_DTYPES, KERNEL_HEAD_DIMS, MAX_TILE_STRIDE, _finite_float, _lam_to_3d, check_norm_weight,
                       _require_tensor)


MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2 (the varlen kernels put the sequence index on axis 1)
# Decode, head_layout="halves": the offset between a group's two d-wide value halves is part of the 32-bit in-tile
# offsets (row·stride_n + col·stride_d + half·split, rows < 128): with strides along N at most 2^22, a split of at
# most 2^30 elements keeps them below 2^31 (127·2^22 + 2^30 + 255 < 2^31).
MAX_V_SPLIT = 2**30
HEAD_LAYOUTS = ("interleaved", "halves")


@dataclass(frozen=True)
class LmArgs:
    heads: int  # diff-heads H (q carries 2H heads)
    kv_heads: int  # key/value groups Hkv (k carries 2·Hkv heads, v Hkv)
    head_dim: int
    scale: float
    lam: torch.Tensor  # varlen: 2-d, broadcastable to (total_q, H); decode: 3-d, broadcastable to (B, H, Nq)


def _common(q, k, v, *, scale, norm_weight, norm_eps, out_scale, for_kernel, names, feat_dims, tile_dims,
            v_halves=False):
    """dtype/device/head-count checks shared by both forms; q, k, v have heads at dim -2 (varlen) or 1 (decode).
    tile_dims: the dims whose strides enter the kernels' 32-bit in-tile offsets (tokens and features: varlen
    (0, 2), decode (2, 3)); batch and head strides go into 64-bit bases and are free.
    v_halves: v has k's head count and width d (decode's head_layout="halves") instead of half of it and 2d."""
    qn, kn, vn = names
    hq, hk, hv = feat_dims
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{qn}, {kn}, {vn} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"{qn}, {kn}, {vn} must be floating point, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{qn}, {kn}, {vn} must be on one device, got {q.device}, {k.device}, {v.device}")
    H2, Hkv2, Hv, d = q.shape[hq], k.shape[hk], v.shape[hv], q.shape[-1]
    if H2 % 2 or Hkv2 % 2:
        raise ValueError(f"{qn} and {kn} must have an even number of heads (pairs 2h, 2h+1), got {H2} and {Hkv2}")
    if v_halves and Hv != Hkv2:
        raise ValueError(f"{vn} must have {Hkv2} heads (as {kn}; head_layout='halves'), got {Hv}")
    if not v_halves and Hv != Hkv2 // 2:
        raise ValueError(f"{vn} must have {Hkv2 // 2} heads (half of {kn}'s {Hkv2}), got {Hv}")
    if (H2 // 2) % (Hkv2 // 2):
        raise ValueError(f"GQA: {qn}'s {H2 // 2} diff-heads must be a multiple of {kn}'s {Hkv2 // 2} groups")
    dv = d if v_halves else 2 * d
    if k.shape[-1] != d or v.shape[-1] != dv:
        raise ValueError(f"head dims: {kn} must end in d={d} and {vn} in {'d' if v_halves else '2d'}={dv}, got "
                         f"{k.shape[-1]} and {v.shape[-1]}")
    if for_kernel:
        if q.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{qn}, {kn}, {vn} dtype must be float16, bfloat16 or float32 for the kernel, got "
                            f"{q.dtype}")
        if d not in KERNEL_HEAD_DIMS:
            raise ValueError(f"head dim d ({qn}.shape[-1]) must be one of {KERNEL_HEAD_DIMS}, got {d}")
        for name, x in zip(names, (q, k, v)):
            if max(x.stride(t) for t in tile_dims) > MAX_TILE_STRIDE:
                raise ValueError(f"{name} has strides {tuple(x.stride())}: the kernel's in-tile offsets are 32-bit "
                                 f"(strides of dims {tile_dims} at most 2^22); pass {name}.contiguous()")
            if x.stride(-1) != 1 and x.numel() > 0:
                raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got {tuple(x.stride())}")
    scale = d**-0.5 if scale is None else _finite_float("scale", scale, positive=True)
    _finite_float("norm_eps", norm_eps, positive=True)
    _finite_float("out_scale", out_scale)
    check_norm_weight(norm_weight, d, q.device, qn, for_kernel=for_kernel)
    return H2 // 2, Hkv2 // 2, d, scale


def _int_vector(name, x, n, device):
    _require_tensor(name, x)
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {x.dtype}")
    if x.dim() != 1 or (n is not None and x.shape[0] != n):
        want = f"({n},)" if n is not None else "1-d"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")


def _max_seqlen(name, x):
    # torch.SymInt: a size under torch.compile(dynamic=True)
    if isinstance(x, bool) or not isinstance(x, (int, torch.SymInt)) or x < 0:
        raise TypeError(f"{name} must be an int >= 0, got {x!r}")
    return x


def check_varlen_args(q, k, v, lam, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale,
                      norm_weight, norm_eps, out_scale, for_kernel):
    for name, x, want in (("q", q, "(total_q, 2H, d)"), ("k", k, "(total_k, 2Hkv, d)"),
                          ("v", v, "(total_k, Hkv, 2d)")):
        if _require_tensor(name, x).dim() != 3:
            raise ValueError(f"{name} must be 3-d {want}, got shape {tuple(x.shape)}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same number of tokens total_k, got {k.shape[0]} and {v.shape[0]}")
    H, Hkv, d, scale = _common(q, k, v, scale=scale, norm_weight=norm_weight, norm_eps=norm_eps,
                               out_scale=out_scale, for_kernel=for_kernel, names=("q", "k", "v"), feat_dims=(1, 1, 1),
                               tile_dims=(0, 2))
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _int_vector("cu_seqlens_q", cu_seqlens_q, None, q.device)
    if cu_seqlens_q.shape[0] < 1:
        raise ValueError("cu_seqlens_q must hold batch + 1 >= 1 entries, got 0")
    _int_vector("cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0], q.device)
    if cu_seqlens_q.shape[0] - 1 > MAX_GRID_Y:
        raise ValueError(f"at most {MAX_GRID_Y} sequences per call (a grid axis of the kernels), got "
                         f"{cu_seqlens_q.shape[0] - 1}")
    mq, mk = _max_seqlen("max_seqlen_q", max_seqlen_q), _max_seqlen("max_seqlen_k", max_seqlen_k)
    if q.device.type == "cpu" and not _traced((q, cu_seqlens_q, cu_seqlens_k)):  # contents: module docstring
        for name, cu, total, most in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], mq),
                                      ("cu_seqlens_k", cu_seqlens_k, k.shape[0], mk)):
            c = cu.tolist()
            if c[0] != 0 or c[-1] != total:
                raise ValueError(f"{name} must start at 0 and end at the total token count {total}, got "
                                 f"{c[0]} ... {c[-1]}")
            lens = [b - a for a, b in zip(c, c[1:])]
            if any(n < 0 for n in lens):
                raise ValueError(f"{name} must be non-decreasing, got {c}")
            if lens and max(lens) > most:
                raise ValueError(f"max_seqlen_{name[-1]}={most} is smaller than the longest sequence in {name} "
                                 f"({max(lens)})")
    return LmArgs(H, Hkv, d, scale, _lam_varlen(lam, q.shape[0], H, _lam_dtype(q), q.device))


def _lam_varlen(lam, total_q, H, dtype, device):
    """λ of the varlen form as a 2-d tensor broadcastable to (total_q, H): a number, a 0-d tensor (per layer), an
    (H,) tensor (per head) or a (total_q, H) tensor (per token, packed like q); also (total_q, 1), (1, H)."""
    if not isinstance(lam, torch.Tensor):
        return _lam_to_3d(lam, 1, H, 1, dtype, device)[0]  # the number checks of the dense op; (1, 1)
    if lam.dim() == 1:
        return _lam_to_3d(lam, 1, H, 1, dtype, device)[0].transpose(0, 1)  # (1, H) or (1, 1)
    if lam.dim() == 0:
        return _lam_to_3d(lam, 1, H, 1, dtype, device)[0]
    if lam.dim() != 2 or lam.shape[0] not in (1, total_q) or lam.shape[1] not in (1, H):
        raise ValueError(f"lam must be a number, a 0-d tensor, an (H,)=({H},) tensor or a tensor broadcastable to "
                         f"(total_q, H)=({total_q}, {H}); got shape {tuple(lam.shape)}")
    # The dense op's dtype/device/finiteness checks, on a (1, N=H, ...) reading of the same tensor.
    return _lam_to_3d(lam.transpose(0, 1)[None], 1, lam.shape[1], lam.shape[0], dtype, device)[0].transpose(0, 1)


def lam_per_token(lam2: torch.Tensor, total_q: int, heads: int) -> torch.Tensor:
    """λ broadcast to (total_q, H) (a view)."""
    return torch.broadcast_to(lam2, (total_q, heads))


def _lam_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def check_head_layout(head_layout):
    if not isinstance(head_layout, str):
        raise TypeError(f"head_layout must be a str, got {type(head_layout).__name__}")
    if head_layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {head_layout!r}")
    return head_layout


def check_decode_args(q, k_cache, v_cache, lam, cache_seqlens, *, scale, norm_weight, norm_eps, out_scale,
                      for_kernel, cache_leftpad=None, head_layout="interleaved"):
    halves = check_head_layout(head_layout) == "halves"
    v_want = "(B, 2Hkv, Nmax, d)" if halves else "(B, Hkv, Nmax, 2d)"
    for name, x, want in (("q", q, "(B, 2H, Nq, d)"), ("k_cache", k_cache, "(B, 2Hkv, Nmax, d)"),
                          ("v_cache", v_cache, v_want)):
        if _require_tensor(name, x).dim() != 4:
            raise ValueError(f"{name} must be 4-d {want}, got shape {tuple(x.shape)}")
    B, _, Nq, _ = q.shape
    if k_cache.shape[0] != B or v_cache.shape[0] != B:
        raise ValueError(f"k_cache and v_cache must have q's batch {B}, got {k_cache.shape[0]}, {v_cache.shape[0]}")
    if k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"k_cache and v_cache must have one length Nmax, got {k_cache.shape[2]}, {v_cache.shape[2]}")
    H, Hkv, d, scale = _common(q, k_cache, v_cache, scale=scale, norm_weight=norm_weight, norm_eps=norm_eps,
                               out_scale=out_scale, for_kernel=for_kernel, names=("q", "k_cache", "v_cache"),
                               feat_dims=(1, 1, 1), tile_dims=(2, 3), v_halves=halves)
    if for_kernel and halves and Hkv * v_cache.stride(1) > MAX_V_SPLIT:
        raise ValueError(f"v_cache has strides {tuple(v_cache.stride())}: with head_layout='halves' the offset "
                         f"between a group's value halves (Hkv·stride(1) = {Hkv * v_cache.stride(1)}) must be at "
                         f"most 2^30 (32-bit in-tile offsets)")
    _int_vector("cache_seqlens", cache_seqlens, B, q.device)
    if cache_leftpad is not None:
        _int_vector("cache_leftpad", cache_leftpad, B, q.device)
    if q.device.type == "cpu" and not _traced((q, cache_seqlens)):  # contents: see the module docstring
        lens = cache_seqlens.tolist()
        bad = [n for n in lens if not Nq <= n <= k_cache.shape[2]]
        if bad:
            raise ValueError(f"cache_seqlens must lie in [Nq, Nmax] = [{Nq}, {k_cache.shape[2]}] (the new queries' "
                             f"own keys are in the cache), got {lens}")
        if cache_leftpad is not None:
            pads = cache_leftpad.tolist()
            if any(not 0 <= p <= n for p, n in zip(pads, lens)):
                raise ValueError(f"cache_leftpad must lie in [0, cache_seqlens[b]] (got {pads} with cache_seqlens "
                                 f"{lens})")
    return LmArgs(H, Hkv, d, scale, _lam_to_3d(lam, B, H, Nq, _lam_dtype(q), q.device))
