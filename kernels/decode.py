"""Decode differential attention against a KV cache: split-K (FlashDecoding) forward with an exact combine.

Layout: the split kernel, the combine kernel -> the launch helper. The public function is `api_lm.diff_attn_decode`.

Split kernel: one program per (sequence, key/value group, block of query rows) and key chunk. Its query rows are all
G·Nq (diff-head, new token) pairs of the group (G = H / Hkv), so each K1, K2 and V tile of the cache is read once per
group, not once per diff-head: decoding is bound by reading the cache, and this is what keeps it near that floor.
It folds its chunk of keys into both maps' online-softmax states (`lm_steps._fold_keys`, the dense forward's step)
and writes the normalised partial outputs O1, O2 (fp32) and their log-sum-exps (log2 domain).

Combine kernel: per (sequence, diff-head, token) row, merges the chunks' partial results of each map exactly
(O = Σ_s 2^(lse_s − M)·O_s / Σ_s 2^(lse_s − M), M = max_s lse_s), then takes the λ-difference in fp32 and applies the
RMS-norm epilogue and out_scale. A chunk with no visible key has lse = −inf and weight 0.

Query i (of Nq) of sequence b sits at position cache_seqlens[b] − Nq + i and sees keys j <= that position, from
cache_leftpad[b] on (0 without it): chunks that lie wholly in the left padding load nothing.

Head layouts, by strides (no copy): a diff-head's two query heads are `stride_qh` apart from the next diff-head's and
`stride_qp` apart from each other; a group's two key heads likewise (`stride_kh`, `stride_kp`); a group's 2d-wide
value is two d-wide halves `stride_vs` apart: column c reads (c % d)·stride_vd + (c // d)·stride_vs. Interleaved
(pairs 2h, 2h+1; v (B, Hkv, Nmax, 2d)): pair = one head stride, split = d·stride_vd. Halves (transformers'
DiffLlama: h and h + H; v (B, 2Hkv, Nmax, d), value halves g and g + Hkv): pair = H (Hkv) head strides, split = Hkv
head strides.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import alloc
from .configs import cdiv, device_sm
from .configs_lm import COMBINE_ROWS, combine_warps, decode_block_m, decode_warps, lm_config
from .fwd import LOG2E, dot_precision
from .layouts import pair_strides, value_strides
from .lm_steps import _finish_maps, _fold_keys, _norm_epilogue, _unmasked_end
from .runtime import device_guard


@triton.jit
def _decode_split_kernel(
    Q, K, V, SEQLENS, LEFTPAD, OPART, LPART,
    stride_qb, stride_qh, stride_qn, stride_qd, stride_qp,
    stride_kb, stride_kh, stride_kn, stride_kd, stride_kp,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_vs,
    B, H, NQ, GROUP, CHUNK, ROW_BLOCKS, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_LEFTPAD: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)  # B·Hkv·row blocks can pass the 65535 limit of grid axes 1 and 2: axis 0
    split = tl.program_id(1)
    rb = pid % ROW_BLOCKS
    bg = pid // ROW_BLOCKS
    b = (bg // (H // GROUP)).to(tl.int64)
    g = (bg % (H // GROUP)).to(tl.int64)
    n_keys = tl.load(SEQLENS + b)

    r = rb * BLOCK_M + tl.arange(0, BLOCK_M)  # row r of the group: diff-head g·GROUP + r // NQ, token r % NQ
    row_ok = r < GROUP * NQ
    h = g * GROUP + r // NQ
    i = r % NQ
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, 2 * HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_ptrs = Q + b * stride_qb + (h[:, None] * stride_qh + i[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q1 = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    q2 = tl.load(q_ptrs + stride_qp, mask=row_ok[:, None], other=0.0)
    k1_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_cols = (offs_dv % HEAD_DIM) * stride_vd + (offs_dv // HEAD_DIM) * stride_vs  # the two d-wide halves
    v_tile = offs_n[:, None] * stride_vn + v_cols[None, :]

    m1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, 2 * HEAD_DIM], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, 2 * HEAD_DIM], dtype=tl.float32)

    # This chunk's keys [start, end). Keys up to n_keys - NQ are visible to every new token: no mask there; the
    # last few blocks are masked. Keys before the left padding's end are never loaded: the chunk then starts there
    # (a chunk wholly inside the padding is empty: lse = -inf, weight 0), its blocks are no longer aligned to
    # BLOCK_N and the last one can cross the chunk's end, so the masked blocks are bounded by `end`, not n_keys:
    # no key is folded by two chunks.
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, n_keys)
    if HAS_LEFTPAD:
        start = tl.maximum(start, tl.load(LEFTPAD + b))
    q_last = i + n_keys - NQ
    mid = _unmasked_end(start, end, n_keys - NQ, True, BLOCK_N)
    acc1, acc2, m1, m2, l1, l2 = _fold_keys(
        acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k1_base + stride_kp, v_base, k_tile, v_tile,
        stride_kn, stride_vn, q_last, start, mid, end, qk_scale, False, True, BLOCK_N, DOT_PRECISION)
    acc1, acc2, m1, m2, l1, l2 = _fold_keys(
        acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k1_base + stride_kp, v_base, k_tile, v_tile,
        stride_kn, stride_vn, q_last, mid, end, end, qk_scale, True, True, BLOCK_N, DOT_PRECISION)
    o1, o2, lse1, lse2 = _finish_maps(acc1, acc2, m1, m2, l1, l2)

    # Partials (2 maps, splits, B, H, NQ[, 2d]): this program's rows are contiguous (h·NQ + i = g·GROUP·NQ + r).
    map_rows = tl.num_programs(1).to(tl.int64) * B * H * NQ
    prow = (split.to(tl.int64) * B + b) * H * NQ + g * GROUP * NQ + r
    o_ptrs = OPART + prow[:, None] * (2 * HEAD_DIM) + offs_dv[None, :]
    tl.store(o_ptrs, o1, mask=row_ok[:, None])
    tl.store(o_ptrs + map_rows * (2 * HEAD_DIM), o2, mask=row_ok[:, None])
    tl.store(LPART + prow, lse1, mask=row_ok)
    tl.store(LPART + map_rows + prow, lse2, mask=row_ok)


@triton.jit
def _merge_step(m, w, acc, lse, o):
    """Fold one chunk's (lse, normalised O) into a running (max, weight sum, weighted sum); -inf chunks add 0."""
    m_new = tl.maximum(m, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_safe)
    p = tl.math.exp2(lse - m_safe)
    return m_new, w * alpha + p, acc * alpha[:, None] + p[:, None] * o


@triton.jit
def _decode_combine_kernel(
    OPART, LPART, LAM, NORM_W, OUT,
    stride_lb, stride_lh, stride_ln,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_w,
    B, H, NQ, SPLITS, norm_eps, out_scale,
    HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # rows h·NQ + i of sequence b
    ok = r < H * NQ
    h = r // NQ
    i = r % NQ
    offs_dv = tl.arange(0, 2 * HEAD_DIM)
    map_rows = tl.cast(SPLITS, tl.int64) * B * H * NQ
    m1 = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    m2 = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    w1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    w2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_R, 2 * HEAD_DIM], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_R, 2 * HEAD_DIM], dtype=tl.float32)
    for s in range(SPLITS):
        prow = (tl.cast(s, tl.int64) * B + b) * H * NQ + r
        o_ptrs = OPART + prow[:, None] * (2 * HEAD_DIM) + offs_dv[None, :]
        lse1 = tl.load(LPART + prow, mask=ok, other=float("-inf"))
        lse2 = tl.load(LPART + map_rows + prow, mask=ok, other=float("-inf"))
        m1, w1, acc1 = _merge_step(m1, w1, acc1, lse1, tl.load(o_ptrs, mask=ok[:, None], other=0.0))
        m2, w2, acc2 = _merge_step(m2, w2, acc2, lse2, tl.load(o_ptrs + map_rows * (2 * HEAD_DIM),
                                                                  mask=ok[:, None], other=0.0))
    lam = tl.load(LAM + b * stride_lb + h * stride_lh + i * stride_ln, mask=ok, other=0.0).to(tl.float32)
    # A row that saw no key anywhere has w = 0 and outputs 0.
    o = acc1 * (1.0 / tl.where(w1 > 0, w1, 1.0))[:, None] - (lam / tl.where(w2 > 0, w2, 1.0))[:, None] * acc2
    o = _norm_epilogue(o, NORM_W, stride_w, norm_eps, out_scale, HAS_NORM, 2 * HEAD_DIM)
    out_ptrs = OUT + b * stride_ob + (h[:, None] * stride_oh + i[:, None] * stride_on + offs_dv[None, :] * stride_od)
    tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=ok[:, None])


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few "SMs", so that small tests exercise several chunks


def pick_splits(programs: int, n_max: int, block_n: int, sm_count: int) -> int:
    """Chunks per (sequence, group, row block): enough programs for about two waves, each chunk at least four key
    blocks long (shorter chunks spend more on the combine than they save), at most 128."""
    want = cdiv(2 * sm_count, max(1, programs))
    return max(1, min(want, cdiv(n_max, 4 * block_n), 128))


def decode_fwd(q, k_cache, v_cache, lam3, norm_weight, cache_seqlens, *, scale, norm_eps, out_scale, num_splits,
               cache_leftpad=None, head_layout="interleaved"):
    """Launch the split and combine kernels (arguments validated by `validate_lm.check_decode_args`); `lam3`
    broadcasts to (B, H, Nq). Returns (B, H, Nq, 2d), a transposed view of a (B, Nq, H, 2d) buffer."""
    B, H2, Nq, d = q.shape
    H, Hkv, n_max = H2 // 2, k_cache.shape[1] // 2, k_cache.shape[2]
    group = H // Hkv
    out = alloc.empty(B, Nq, H, 2 * d, dtype=q.dtype, device=q.device).transpose(1, 2)
    if B == 0 or Nq == 0:
        return out
    cfg = lm_config("decode", d, q.element_size(), device_sm(q.device))
    block_m = decode_block_m(group * Nq, cfg.kwargs["BLOCK_M"])
    block_n = cfg.kwargs["BLOCK_N"]
    row_blocks = cdiv(group * Nq, block_m)
    programs = B * Hkv * row_blocks
    splits = num_splits or pick_splits(programs, n_max, block_n, _sm_count(q.device))
    chunk = cdiv(cdiv(max(n_max, 1), splits), block_n) * block_n
    splits = cdiv(max(n_max, 1), chunk)  # no chunk that starts past the cache
    opart = alloc.empty(2, splits, B, H, Nq, 2 * d, dtype=torch.float32, device=q.device)
    lpart = alloc.empty(2, splits, B, H, Nq, dtype=torch.float32, device=q.device)
    lam = torch.broadcast_to(lam3, (B, H, Nq))
    # The head layout as strides (kernels/layouts.py, shared with the dense op): per-head stride and pair offset of
    # q and k, per-group stride and split offset of v.
    _, sq, sqp, _, _ = pair_strides(q, head_layout, H)
    _, sk, skp, _, _ = pair_strides(k_cache, head_layout, Hkv, key=True)
    _, sv, svs, _, _ = value_strides(v_cache, head_layout, Hkv)
    with device_guard(q.device):
        _decode_split_kernel[(programs, splits)](
            q, k_cache, v_cache, cache_seqlens, cache_leftpad, opart, lpart,
            q.stride(0), sq, q.stride(2), q.stride(3), sqp,
            k_cache.stride(0), sk, k_cache.stride(2), k_cache.stride(3), skp,
            v_cache.stride(0), sv, v_cache.stride(2), v_cache.stride(3), svs,
            B, H, Nq, group, chunk, row_blocks, scale * LOG2E,
            HEAD_DIM=d, HAS_LEFTPAD=cache_leftpad is not None, DOT_PRECISION=dot_precision(q.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=decode_warps(block_m, d, cfg.num_warps), num_stages=cfg.num_stages,
        )
        _decode_combine_kernel[(B, cdiv(H * Nq, COMBINE_ROWS))](
            opart, lpart, lam, norm_weight, out, *lam.stride(), *out.stride(),
            norm_weight.stride(0) if norm_weight is not None else 0,
            B, H, Nq, splits, norm_eps, out_scale,
            HEAD_DIM=d, HAS_NORM=norm_weight is not None, BLOCK_R=COMBINE_ROWS, num_warps=combine_warps(d),
        )
    return out
