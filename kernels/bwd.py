"""Fused differential-attention backward: three launches, no N x N tensor, no atomics.

Layout: jit kernels (dK/dV, dQ; the preprocess kernel is in `bwd_pre.py`) -> launch helper. Per diff-head, with
P1, P2 the two softmax maps, O1 = P1·V, O2 = P2·V, o = O1 − λ·O2 (before the epilogue) and dO = ∂L/∂o:

    Δ1 = rowsum(dO ⊙ O1) = rowsum(dO ⊙ o) + λ·Δ2,   Δ2 = rowsum(dO ⊙ O2),   ∂L/∂λ (per row) = −Δ2
    dP = dO·Vᵀ (one matmul, shared by both maps)
    dS1 = P1 ⊙ (dP − Δ1),   dS2 = −λ·P2 ⊙ (dP − Δ2)
    dQi = s·dSi·Ki,   dKi = s·dSiᵀ·Qi,   dV = (P1 − λ·P2)ᵀ·dO (one matmul on the combined map)

P1 and P2 are recomputed from the forward's per-row log-sum-exps. dK/dV and dQ are computed by separate programs
(one over key blocks, one over query blocks) so that every output element has exactly one writer: gradients are
bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import alloc
from .bwd_pre import _bwd_preprocess_kernel
from .configs import (PRUNE, Problem, autotune_configs, cdiv, device_sm, grid_bucket, launch, pre_block_m,
                      seqlen_bucket)
from .fwd import LOG2E, _block_and_head, dot_precision
from .runtime import device_guard
from .validate import tile_strides_ok


@triton.jit
def _load_query_rows(q_base, stride_qh, stride_qn, stride_qd, do_base, stride_on, stride_od, LSE, DELTA, row_base,
                     lam_base, stride_ln, start_m, offs_d, offs_dv, N, BLOCK_M: tl.constexpr):
    """Everything the backward needs for BLOCK_M query rows from `start_m` of one diff-head: Q1, Q2, dO, both LSEs
    (log2 domain), both Δs and λ. Rows past N read zeros and lse = +inf, so their probabilities are exactly 0.

    Row offsets are 64-bit per element (rows can lie more than 2^31 elements apart). They depend on the loop
    variable, so nothing is hoisted out of the backward loops: a loop-invariant int32 tile-offset tensor plus a
    64-bit scalar base (the forward's scheme) stays live across the loop and made dK/dV spill on sm_80/sm_90."""
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    q_ok = offs_m < N
    r64 = tl.cast(start_m, tl.int64)  # the loop variable: a plain int under the interpreter
    q_ptrs = q_base + (offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    q1 = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
    q2 = tl.load(q_ptrs + stride_qh, mask=q_ok[:, None], other=0.0)
    do = tl.load(do_base + (offs_m.to(tl.int64)[:, None] * stride_on + offs_dv[None, :] * stride_od),
                 mask=q_ok[:, None], other=0.0)
    lse1 = tl.load(LSE + row_base + r64 + rows, mask=q_ok, other=float("inf"))
    lse2 = tl.load(LSE + row_base + N + r64 + rows, mask=q_ok, other=float("inf"))
    d1 = tl.load(DELTA + row_base + r64 + rows, mask=q_ok, other=0.0)
    d2 = tl.load(DELTA + row_base + N + r64 + rows, mask=q_ok, other=0.0)
    lam = tl.load(lam_base + r64 * stride_ln + rows * stride_ln, mask=q_ok, other=0.0).to(tl.float32)
    return q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, q_ok


@triton.jit
def _load_key_rows(k_base, stride_kh, stride_kn, stride_kd, v_base, stride_vn, stride_vd, start_n, offs_d, offs_dv,
                   N, BLOCK_N: tl.constexpr):
    """K1, K2 and V rows from `start_n` of one diff-head (zeros past N), their indices and the in-sequence mask.
    64-bit row offsets, as in `_load_query_rows`."""
    keys = tl.arange(0, BLOCK_N)
    offs_n = start_n + keys
    key_ok = offs_n < N
    k_ptrs = k_base + (offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    k1 = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    k2 = tl.load(k_ptrs + stride_kh, mask=key_ok[:, None], other=0.0)
    v = tl.load(v_base + (offs_n.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :] * stride_vd),
                mask=key_ok[:, None], other=0.0)
    return k1, k2, v, offs_n, key_ok


@triton.jit
def _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, q_base, stride_qh, stride_qn, stride_qd, do_base, stride_on,
                stride_od, LSE, DELTA, row_base, lam_base, stride_ln, offs_d, offs_dv, N, lo, hi, qk_scale, do_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                DO_DK: tl.constexpr, DO_DV: tl.constexpr):
    """Fold query blocks [lo, hi) into one key block's dK1, dK2 (DO_DK) and dV (DO_DV) (keys along rows: no
    transposes).

    Only MASKED blocks (the causal diagonal) build a mask. Query rows past N need none: they read lse = +inf, so
    their probabilities are exactly 0. Key rows past N need none either: each accumulator row belongs to one key,
    and rows past N are never stored.
    """
    for start_m in range(lo, hi, BLOCK_M):
        q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, q_ok = _load_query_rows(
            q_base, stride_qh, stride_qn, stride_qd, do_base, stride_on, stride_od, LSE, DELTA, row_base,
            lam_base, stride_ln, start_m, offs_d, offs_dv, N, BLOCK_M)
        p1t = tl.math.exp2(tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION) * qk_scale - lse1[None, :])
        p2t = tl.math.exp2(tl.dot(k2, tl.trans(q2), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
        if MASKED:
            visible = offs_m[None, :] >= offs_n[:, None]
            p1t = tl.where(visible, p1t, 0.0)
            p2t = tl.where(visible, p2t, 0.0)
        if DO_DV:
            dv = tl.dot((p1t - lam[None, :] * p2t).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if DO_DK:
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) * do_scale
            ds1t = p1t * (dpt - d1[None, :])
            ds2t = -lam[None, :] * p2t * (dpt - d2[None, :])
            dk1 = tl.dot(ds1t.to(q1.dtype), q1, dk1, input_precision=DOT_PRECISION)
            dk2 = tl.dot(ds2t.to(q2.dtype), q2, dk2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, start_n, N, qk_scale, do_scale,
               CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DO_DK: tl.constexpr, DO_DV: tl.constexpr):
    """All query blocks that see this key block: the causal diagonal (masked), then the rest (unmasked). In the
    two-pass (split) form, causal runs one masked loop instead: two loop bodies per pass (four in all) spill
    where one does not."""
    if CAUSAL and not (DO_DK and DO_DV):
        lo = (start_n // BLOCK_M) * BLOCK_M
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, *common_q, lo, N, qk_scale, do_scale,
                                   True, BLOCK_M, DOT_PRECISION, DO_DK, DO_DV)
        return dk1, dk2, dv
    if CAUSAL:
        # Queries before this key block never see it: start at the query block holding `start_n`. Query blocks
        # from `mid` on lie wholly below the diagonal and need no mask.
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, N)
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, *common_q, lo, mid, qk_scale, do_scale,
                                   True, BLOCK_M, DOT_PRECISION, DO_DK, DO_DV)
    else:
        mid = 0
    dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, *common_q, mid, N, qk_scale, do_scale,
                               False, BLOCK_M, DOT_PRECISION, DO_DK, DO_DV)
    return dk1, dk2, dv


@triton.jit
def _store_dk(DK, dk1, dk2, b, h, start_n, stride_dkb, stride_dkh, stride_dkn, stride_dkd, offs_d, key_ok, sm_scale,
              BLOCK_N: tl.constexpr):
    keys = tl.arange(0, BLOCK_N)
    dk_ptrs = (DK + b * stride_dkb + (2 * h) * stride_dkh + start_n.to(tl.int64) * stride_dkn
               + (keys[:, None] * stride_dkn + offs_d[None, :] * stride_dkd))
    tl.store(dk_ptrs, (dk1 * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    tl.store(dk_ptrs + stride_dkh, (dk2 * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, LAM, DK, DV,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N, N_BUCKET, GRID_BUCKET, qk_scale, sm_scale, do_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, ARCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr = False,
):
    """One program: BLOCK_N keys of one diff-head; loops over the query blocks that see them. Works transposed
    (keys along rows) so that dK1, dK2 and dV accumulate without a transpose. Causal key blocks are heaviest
    first already (block 0 is seen by every query).

    SPLIT: two passes over the queries, dK1/dK2 first (stored), then dV. Only 2d fp32 accumulator columns are live
    at a time instead of 4d, which lets d = 128 use 64-key blocks (wgmma on Hopper) without spilling; the price is
    recomputing both maps (two QKᵀ and their exponentials) in the second pass. Off by default, so that a config
    without the flag (e.g. one given to `force_configs`) launches the one-pass form."""
    block_n, bh = _block_and_head(N, BLOCK_N, False)
    start_n = block_n * BLOCK_N
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, 2 * HEAD_DIM)
    k1, k2, v, offs_n, key_ok = _load_key_rows(K + b * stride_kb + (2 * h) * stride_kh, stride_kh, stride_kn,
                                               stride_kd, V + b * stride_vb + h * stride_vh, stride_vn, stride_vd,
                                               start_n, offs_d, offs_dv, N, BLOCK_N)

    dk1 = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, 2 * HEAD_DIM], dtype=tl.float32)

    q_base = Q + b * stride_qb + (2 * h) * stride_qh
    do_base = DO + b * stride_ob + h * stride_oh
    row_base = (b * 2 * H + 2 * h) * N  # LSE and DELTA rows of map 1; map 2 follows at +N
    lam_base = LAM + b * stride_lb + h * stride_lh
    common_q = (q_base, stride_qh, stride_qn, stride_qd, do_base, stride_on, stride_od, LSE, DELTA, row_base,
                lam_base, stride_ln, offs_d, offs_dv, N)
    if SPLIT:
        dk1, dk2, dv = _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, start_n, N, qk_scale, do_scale,
                                  CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, True, False)
        _store_dk(DK, dk1, dk2, b, h, start_n, stride_dkb, stride_dkh, stride_dkn, stride_dkd, offs_d, key_ok,
                  sm_scale, BLOCK_N)
        dv = _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, start_n, N, qk_scale, do_scale,
                        CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, False, True)[2]
    else:
        dk1, dk2, dv = _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, start_n, N, qk_scale, do_scale,
                                  CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, True, True)
        _store_dk(DK, dk1, dk2, b, h, start_n, stride_dkb, stride_dkh, stride_dkn, stride_dkd, offs_d, key_ok,
                  sm_scale, BLOCK_N)

    keys = tl.arange(0, BLOCK_N)
    n64 = start_n.to(tl.int64)
    tl.store(DV + b * stride_dvb + h * stride_dvh + n64 * stride_dvn
             + (keys[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd),
             (dv * do_scale).to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_inner(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, k_base, stride_kh, stride_kn, stride_kd,
              v_base, stride_vn, stride_vd, offs_d, offs_dv, N, lo, hi, qk_scale, do_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into one query block's dQ1, dQ2.

    MASKED blocks (the causal diagonal and the sequence tail) mask keys: a key past N would add p·0 to dQ, but its
    p = exp(-lse) can overflow to inf, and inf·0 is NaN. Query rows past N read lse = +inf (p = 0) and need none.
    """
    for start_n in range(lo, hi, BLOCK_N):
        k1, k2, v, offs_n, key_ok = _load_key_rows(k_base, stride_kh, stride_kn, stride_kd, v_base, stride_vn,
                                                   stride_vd, start_n, offs_d, offs_dv, N, BLOCK_N)
        p1 = tl.math.exp2(tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION) * qk_scale - lse1[:, None])
        p2 = tl.math.exp2(tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= offs_n[None, :])
            p1 = tl.where(visible, p1, 0.0)
            p2 = tl.where(visible, p2, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) * do_scale
        ds1 = p1 * (dp - d1[:, None])
        ds2 = -lam[:, None] * p2 * (dp - d2[:, None])
        dq1 = tl.dot(ds1.to(k1.dtype), k1, dq1, input_precision=DOT_PRECISION)
        dq2 = tl.dot(ds2.to(k2.dtype), k2, dq2, input_precision=DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, LAM, DQ,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N, N_BUCKET, GRID_BUCKET, qk_scale, sm_scale, do_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, ARCH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M queries of one diff-head; loops over the key blocks they see (causal: heaviest
    blocks first)."""
    block_m, bh = _block_and_head(N, BLOCK_M, CAUSAL)
    start_m = block_m * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, 2 * HEAD_DIM)
    row_base = (b * 2 * H + 2 * h) * N
    q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, q_ok = _load_query_rows(
        Q + b * stride_qb + (2 * h) * stride_qh, stride_qh, stride_qn, stride_qd,
        DO + b * stride_ob + h * stride_oh, stride_on, stride_od, LSE, DELTA, row_base,
        LAM + b * stride_lb + h * stride_lh, stride_ln, start_m, offs_d, offs_dv, N, BLOCK_M)

    dq1 = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * stride_kb + (2 * h) * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # Keys below `lo` are visible to every row of the block and exist: no mask. [lo, hi) holds the causal
    # diagonal or the sequence tail; causal programs skip key blocks past their last row.
    if CAUSAL:
        lo = (start_m // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, N)
    else:
        lo = (N // BLOCK_N) * BLOCK_N
        hi = N
    common = (offs_m, k_base, stride_kh, stride_kn, stride_kd, v_base, stride_vn, stride_vd, offs_d, offs_dv, N)
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, *common, 0, lo, qk_scale, do_scale,
                         False, CAUSAL, BLOCK_N, DOT_PRECISION)
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, *common, lo, hi, qk_scale, do_scale,
                         True, CAUSAL, BLOCK_N, DOT_PRECISION)

    rows = tl.arange(0, BLOCK_M)
    dq_ptrs = (DQ + b * stride_dqb + (2 * h) * stride_dqh + start_m.to(tl.int64) * stride_dqn
               + (rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd))
    tl.store(dq_ptrs, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])
    tl.store(dq_ptrs + stride_dqh, (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


_KEY = ["N_BUCKET", "GRID_BUCKET", "HEAD_DIM", "CAUSAL", "ARCH"]  # ARCH: see the forward's key (fwd.py)
_bwd_dkdv = triton.autotune(configs=autotune_configs("dkdv"), key=_KEY,
                            prune_configs_by={"early_config_prune": PRUNE["dkdv"]})(_bwd_dkdv_kernel)
_bwd_dq = triton.autotune(configs=autotune_configs("dq"), key=_KEY,
                          prune_configs_by={"early_config_prune": PRUNE["dq"]})(_bwd_dq_kernel)


def diff_attn_bwd(dout, q, k, v, lam_bhn, norm_weight, o_ref, o2, lse, *, causal, scale, norm_eps, out_scale,
                  needs_dlam, needs_dw):
    """Gradients (dq, dk, dv, dlam_bhn, dnorm_weight); the last two are None when not needed.

    `o_ref` is the pre-norm difference when `norm_weight` is given, else the forward's output.
    """
    B, H2, N, d = q.shape
    H = H2 // 2
    if not tile_strides_ok(dout):  # an exotic incoming gradient layout: copy it rather than risk int32 offsets
        dout = dout.contiguous()
    has_norm = norm_weight is not None
    pre_m = pre_block_m(d)
    n_pre = cdiv(N, pre_m)
    delta = alloc.empty(B, H2, N, dtype=torch.float32, device=q.device)
    do = alloc.empty(B, H, N, 2 * d, dtype=q.dtype, device=q.device) if has_norm else None
    dw_part = alloc.empty(B * H * n_pre, 2 * d, dtype=torch.float32, device=q.device) if has_norm and needs_dw \
        else None
    dlam = alloc.empty(B, H, N, dtype=torch.float32, device=q.device) if needs_dlam else None
    # With the norm, the main kernels read the epilogue's gradient; without it, the incoming gradient itself
    # and apply out_scale (do_scale) inside.
    g, do_scale = (do, 1.0) if has_norm else (dout, out_scale)
    dq = alloc.empty_like(q)
    dk = alloc.empty_like(k)
    dv = alloc.empty_like(v)
    problem = Problem(d, q.element_size(), causal, N, device_sm(q.device))
    kwargs = dict(HEAD_DIM=d, CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype), ARCH=problem.sm)
    scalars = (H, N, seqlen_bucket(N), grid_bucket(B, H, N), scale * LOG2E, scale, do_scale)
    with device_guard(q.device):
        _bwd_preprocess_kernel[(n_pre * B * H,)](
            dout, o_ref, o2, lam_bhn, norm_weight, do, delta, dw_part, dlam,
            *dout.stride(), *o_ref.stride(), *lam_bhn.stride(), norm_weight.stride(0) if has_norm else 0,
            H, N, norm_eps, out_scale,
            HEAD_DIM=d, HAS_NORM=has_norm, NEED_DW=dw_part is not None, NEED_DLAM=needs_dlam, BLOCK_M=pre_m,
        )
        launch("dkdv", _bwd_dkdv, lambda meta: (cdiv(N, meta["BLOCK_N"]) * B * H,), (
            q, k, v, g, lse, delta, lam_bhn, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *g.stride(), *lam_bhn.stride(), *dk.stride(), *dv.stride(),
            *scalars), kwargs, problem)
        launch("dq", _bwd_dq, lambda meta: (cdiv(N, meta["BLOCK_M"]) * B * H,), (
            q, k, v, g, lse, delta, lam_bhn, dq,
            *q.stride(), *k.stride(), *v.stride(), *g.stride(), *lam_bhn.stride(), *dq.stride(),
            *scalars), kwargs, problem)
    dw = dw_part.sum(0).to(norm_weight.dtype) if dw_part is not None else None
    return dq, dk, dv, dlam, dw
