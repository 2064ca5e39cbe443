"""Varlen differential-attention forward: packed sequences of different lengths (FlashAttention's varlen
convention), GQA-native, causal aligned bottom-right.

Layout: the jit kernel -> its launch helper. The backward is in `varlen_bwd.py`, the public function in `api_lm.py`,
the autograd wiring (Function, torch.library ops) in `ops_lm.py`, the shared inner steps in `lm_steps.py`.

q (total_q, 2H, d), k (total_k, 2Hkv, d), v (total_k, Hkv, 2d); sequence b owns tokens [cu_q[b], cu_q[b+1]) of q
and [cu_k[b], cu_k[b+1]) of k and v. One program owns BLOCK_M query rows of one diff-head h of one sequence and
streams that sequence's keys of group g = h // (H / Hkv): K/V are read in place (no repeat), the group's diff-heads
find them in L2. Programs past their sequence's end exit at once (the grid is sized by max_seqlen_q).

Saved for the backward (when asked): LSE (2H, total_q) fp32 (log2 domain; rows 2h and 2h+1 are diff-head h's two
maps; +inf where a row saw no key), O2 (H, total_q, 2d) and the pre-norm difference (H, total_q, 2d) with the norm.
Head-major so that the dense backward preprocess (bwd_pre.py) reads them as one (1, H, total_q, ·) batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import alloc
from .configs import cdiv, device_sm
from .configs_lm import lm_config
from .fwd import LOG2E, dot_precision
from .lm_steps import _finish_maps, _fold_keys, _norm_epilogue, _unmasked_end
from .runtime import device_guard


@triton.jit
def _seq_bounds(CU_Q, CU_K, b):
    """(first q token, q length, first k token, k length) of sequence b; offsets as int64."""
    q0 = tl.load(CU_Q + b)
    k0 = tl.load(CU_K + b)
    lq = tl.load(CU_Q + b + 1) - q0
    lk = tl.load(CU_K + b + 1) - k0
    return q0.to(tl.int64), lq, k0.to(tl.int64), lk


@triton.jit
def _varlen_fwd_kernel(
    Q, K, V, LAM, NORM_W, OUT, LSE, O2, OPRE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_lt, stride_lh,
    stride_ot, stride_oh, stride_od,
    stride_w,
    H, GROUP, TOTAL_Q, qk_scale, norm_eps, out_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_NORM: tl.constexpr, SAVE_FOR_BWD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q0, lq, k0, lk = _seq_bounds(CU_Q, CU_K, b)
    row0 = start_m * BLOCK_M
    if row0 < lq:
        g = (h // GROUP).to(tl.int64)
        h64 = h.to(tl.int64)
        rows = tl.arange(0, BLOCK_M)
        offs_m = row0 + rows
        row_ok = offs_m < lq
        offs_d = tl.arange(0, HEAD_DIM)
        offs_dv = tl.arange(0, 2 * HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        t0 = q0 + row0  # first token of the block (int64)

        q1_base = Q + t0 * stride_qt + (2 * h64) * stride_qh
        q_tile = rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q1 = tl.load(q1_base + q_tile, mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q1_base + stride_qh + q_tile, mask=row_ok[:, None], other=0.0)
        k1_base = K + k0 * stride_kt + (2 * g) * stride_kh
        v_base = V + k0 * stride_vt + g * stride_vh
        k_tile = offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_tile = offs_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd

        m1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        m2 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
        l2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, 2 * HEAD_DIM], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, 2 * HEAD_DIM], dtype=tl.float32)

        # Bottom-right causal: row i sees keys j <= i + lk - lq. Keys past the block's last row's limit are
        # skipped, keys visible to its first row (and inside the sequence) need no mask.
        q_last = offs_m + (lk - lq)
        hi = lk
        if CAUSAL:
            hi = tl.maximum(tl.minimum(lk, row0 + BLOCK_M + lk - lq), 0)
        mid = _unmasked_end(0, hi, row0 + lk - lq, CAUSAL, BLOCK_N)
        acc1, acc2, m1, m2, l1, l2 = _fold_keys(
            acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k1_base + stride_kh, v_base, k_tile, v_tile,
            stride_kt, stride_vt, q_last, 0, mid, lk, qk_scale, False, CAUSAL, BLOCK_N, DOT_PRECISION)
        acc1, acc2, m1, m2, l1, l2 = _fold_keys(
            acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k1_base + stride_kh, v_base, k_tile, v_tile,
            stride_kt, stride_vt, q_last, mid, hi, lk, qk_scale, True, CAUSAL, BLOCK_N, DOT_PRECISION)

        o1, o2, lse1, lse2 = _finish_maps(acc1, acc2, m1, m2, l1, l2)
        sav = (h64 * TOTAL_Q + t0) * (2 * HEAD_DIM) + (rows[:, None] * (2 * HEAD_DIM) + offs_dv[None, :])
        if SAVE_FOR_BWD:
            tl.store(O2 + sav, o2.to(O2.dtype.element_ty), mask=row_ok[:, None])
            # +inf for rows without keys: the backward's exp2(s - lse) is then exactly 0
            lse_base = LSE + (2 * h64) * TOTAL_Q + t0
            tl.store(lse_base + rows, tl.where(l1 > 0, lse1, float("inf")), mask=row_ok)
            tl.store(lse_base + TOTAL_Q + rows, tl.where(l2 > 0, lse2, float("inf")), mask=row_ok)
        lam = tl.load(LAM + t0 * stride_lt + h64 * stride_lh + rows * stride_lt, mask=row_ok,
                      other=0.0).to(tl.float32)
        o = o1 - lam[:, None] * o2  # in fp32, before any down-cast
        if HAS_NORM and SAVE_FOR_BWD:
            tl.store(OPRE + sav, o.to(OPRE.dtype.element_ty), mask=row_ok[:, None])
        o = _norm_epilogue(o, NORM_W, stride_w, norm_eps, out_scale, HAS_NORM, 2 * HEAD_DIM)
        out_ptrs = (OUT + t0 * stride_ot + h64 * stride_oh
                    + (rows[:, None] * stride_ot + offs_dv[None, :] * stride_od))
        tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=row_ok[:, None])


def varlen_fwd(q, k, v, lam_th, norm_weight, cu_q, cu_k, max_seqlen_q, *, causal, scale, norm_eps, out_scale,
               save_for_bwd):
    """Launch the varlen forward (arguments validated by `validate_lm.check_varlen_args`); `lam_th` broadcasts
    to (total_q, H). Returns (out (total_q, H, 2d), lse, o2, o_pre); the last three None unless `save_for_bwd`
    (o_pre also None without the norm)."""
    total_q, H2, d = q.shape
    H, Hkv = H2 // 2, k.shape[1] // 2
    batch = cu_q.shape[0] - 1
    out = alloc.empty(total_q, H, 2 * d, dtype=q.dtype, device=q.device)
    lse = o2 = o_pre = None
    if save_for_bwd:
        lse = alloc.empty(H2, total_q, dtype=torch.float32, device=q.device)
        o2 = alloc.empty(H, total_q, 2 * d, dtype=q.dtype, device=q.device)
        if norm_weight is not None:
            o_pre = alloc.empty(H, total_q, 2 * d, dtype=q.dtype, device=q.device)
    if total_q == 0 or batch == 0 or max_seqlen_q == 0:
        return out, lse, o2, o_pre
    lam_th = torch.broadcast_to(lam_th, (total_q, H))
    cfg = lm_config("varlen_fwd", d, q.element_size(), device_sm(q.device))
    grid = (cdiv(max_seqlen_q, cfg.kwargs["BLOCK_M"]), batch, H)
    with device_guard(q.device):
        _varlen_fwd_kernel[grid](
            q, k, v, lam_th, norm_weight, out, lse, o2, o_pre, cu_q, cu_k,
            *q.stride(), *k.stride(), *v.stride(), *lam_th.stride(), *out.stride(),
            norm_weight.stride(0) if norm_weight is not None else 0,
            H, H // Hkv, total_q, scale * LOG2E, norm_eps, out_scale,
            HEAD_DIM=d, CAUSAL=causal, HAS_NORM=norm_weight is not None, SAVE_FOR_BWD=save_for_bwd,
            DOT_PRECISION=dot_precision(q.dtype), **cfg.all_kwargs(),
        )
    return out, lse, o2, o_pre
