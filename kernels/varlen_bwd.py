"""Varlen differential-attention backward (GQA-native, deterministic). The autograd wiring of `diff_attn_varlen`
(an eager autograd.Function and the torch.library ops) is in ops_lm.py.

Three launches, as the dense backward (bwd.py has the formulas): the dense preprocess kernel (bwd_pre.py, reused as
is: the varlen forward saves its state head-major, so the packed batch reads as one (1, H, total_q, ·) sequence)
computes both Δs, the norm's backward and λ's gradient; then dK/dV and dQ.

GQA without atomics: one dK/dV program owns BLOCK_N keys of one key/value group of one sequence and loops over the
group's H / Hkv diff-heads, so the group's dK1, dK2 and dV are summed in registers in a fixed order and stored once.
dQ: one program per BLOCK_M queries of one diff-head. Every output element has one writer: bitwise deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import alloc
from .bwd_pre import _bwd_preprocess_kernel
from .bwd_steps import _dq_block
from .configs import cdiv, device_sm, pre_block_m
from .configs_lm import lm_config
from .fwd import LOG2E, dot_precision
from .lm_steps import _unmasked_end
from .runtime import device_guard
from .varlen import _seq_bounds


@triton.jit
def _load_q_block(q_base, stride_qh, stride_qt, do_base, stride_ot, LSE, DELTA, lse_row, lam_base, stride_lt,
                  start_m, lq, TOTAL_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Q1, Q2, dO, both LSEs and Δs and λ of BLOCK_M query rows of one diff-head; rows past the sequence read
    zeros and lse = +inf, so their probabilities are exactly 0. 64-bit row offsets (see bwd._load_query_rows)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q_ok = offs_m < lq
    m64 = offs_m.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_base + (m64[:, None] * stride_qt + offs_d[None, :])
    q1 = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
    q2 = tl.load(q_ptrs + stride_qh, mask=q_ok[:, None], other=0.0)
    do = tl.load(do_base + (m64[:, None] * stride_ot + tl.arange(0, 2 * HEAD_DIM)[None, :]), mask=q_ok[:, None],
                 other=0.0)
    lse1 = tl.load(LSE + lse_row + m64, mask=q_ok, other=float("inf"))
    lse2 = tl.load(LSE + lse_row + TOTAL_Q + m64, mask=q_ok, other=float("inf"))
    d1 = tl.load(DELTA + lse_row + m64, mask=q_ok, other=0.0)
    d2 = tl.load(DELTA + lse_row + TOTAL_Q + m64, mask=q_ok, other=0.0)
    lam = tl.load(lam_base + m64 * stride_lt, mask=q_ok, other=0.0).to(tl.float32)
    return q1, q2, do, lse1, lse2, d1, d2, lam, offs_m


@triton.jit
def _load_k_block(k_base, stride_kh, stride_kt, v_base, stride_vt, start_n, lk, MASKED: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """K1, K2, V of BLOCK_N keys of one group; zeros past the sequence when MASKED."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_ok = offs_n < lk
    n64 = offs_n.to(tl.int64)
    k_ptrs = k_base + (n64[:, None] * stride_kt + tl.arange(0, HEAD_DIM)[None, :])
    v_ptrs = v_base + (n64[:, None] * stride_vt + tl.arange(0, 2 * HEAD_DIM)[None, :])
    if MASKED:
        k1 = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
        k2 = tl.load(k_ptrs + stride_kh, mask=key_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        k1 = tl.load(k_ptrs)
        k2 = tl.load(k_ptrs + stride_kh)
        v = tl.load(v_ptrs)
    return k1, k2, v, offs_n, key_ok


@triton.jit
def _dkdv_steps(dk1, dk2, dv, k1, k2, v, offs_n, q_base, stride_qh, stride_qt, do_base, stride_ot, LSE, DELTA,
                lse_row, lam_base, stride_lt, lo, hi, lq, shift, TOTAL_Q, qk_scale, do_scale,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold query blocks [lo, hi) of one diff-head into one key block's dK1, dK2, dV (keys along rows). MASKED:
    the causal diagonal (query i sees key j iff i + shift >= j). Key rows past the sequence need no mask: they are
    never stored, and each accumulator row belongs to one key."""
    for start_m in range(lo, hi, BLOCK_M):
        q1, q2, do, lse1, lse2, d1, d2, lam, offs_m = _load_q_block(
            q_base, stride_qh, stride_qt, do_base, stride_ot, LSE, DELTA, lse_row, lam_base, stride_lt, start_m, lq,
            TOTAL_Q, HEAD_DIM, BLOCK_M)
        p1t = tl.math.exp2(tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION) * qk_scale - lse1[None, :])
        p2t = tl.math.exp2(tl.dot(k2, tl.trans(q2), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
        if MASKED:
            visible = (offs_m[None, :] + shift) >= offs_n[:, None]
            p1t = tl.where(visible, p1t, 0.0)
            p2t = tl.where(visible, p2t, 0.0)
        dv = tl.dot((p1t - lam[None, :] * p2t).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) * do_scale
        ds1t = p1t * (dpt - d1[None, :])
        ds2t = -lam[None, :] * p2t * (dpt - d2[None, :])
        dk1 = tl.dot(ds1t.to(q1.dtype), q1, dk1, input_precision=DOT_PRECISION)
        dk2 = tl.dot(ds2t.to(q2.dtype), q2, dk2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def _varlen_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, LAM, DK, DV, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    GROUP, TOTAL_Q, qk_scale, sm_scale, do_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    b = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    q0, lq, k0, lk = _seq_bounds(CU_Q, CU_K, b)
    if start_n < lk:
        k1, k2, v, offs_n, key_ok = _load_k_block(K + k0 * stride_kt + (2 * g) * stride_kh, stride_kh, stride_kt,
                                                  V + k0 * stride_vt + g * stride_vh, stride_vt, start_n, lk, True,
                                                  HEAD_DIM, BLOCK_N)
        dk1 = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dk2 = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, 2 * HEAD_DIM], dtype=tl.float32)
        shift = lk - lq  # query i sees key j iff i + shift >= j (bottom-right)
        lo = 0
        if CAUSAL:  # queries before `lo` never see this block
            lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        for j in range(GROUP):  # the group's diff-heads, in order: a fixed summation order
            h = g * GROUP + j
            q_base = Q + q0 * stride_qt + (2 * h) * stride_qh
            do_base = DO + q0 * stride_ot + h * stride_oh
            lse_row = (2 * h) * TOTAL_Q + q0
            lam_base = LAM + q0 * stride_lt + h * stride_lh
            # Causal: one masked loop over every query block that sees this key block. A second, mask-free loop
            # for the blocks wholly below the diagonal (the dense backward's split) spilled 36-160 B here: the
            # group loop around it keeps more registers live.
            dk1, dk2, dv = _dkdv_steps(dk1, dk2, dv, k1, k2, v, offs_n, q_base, stride_qh, stride_qt, do_base,
                                       stride_ot, LSE, DELTA, lse_row, lam_base, stride_lt, lo, lq, lq, shift,
                                       TOTAL_Q, qk_scale, do_scale, CAUSAL, HEAD_DIM, BLOCK_M, DOT_PRECISION)
        n64 = offs_n.to(tl.int64)
        dk_ptrs = DK + k0 * stride_dkt + (2 * g) * stride_dkh + (n64[:, None] * stride_dkt
                                                                + tl.arange(0, HEAD_DIM)[None, :])
        tl.store(dk_ptrs, (dk1 * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(dk_ptrs + stride_dkh, (dk2 * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(DV + k0 * stride_dvt + g * stride_dvh + (n64[:, None] * stride_dvt
                                                        + tl.arange(0, 2 * HEAD_DIM)[None, :]),
                 (dv * do_scale).to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_steps(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, k_base, stride_kh, stride_kt, v_base,
              stride_vt, lo, hi, lk, shift, qk_scale, do_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into one query block's dQ1, dQ2. MASKED blocks mask keys past the sequence (their
    p = exp2(-lse) could overflow, and inf·0 is NaN) and, with CAUSAL, keys past each row's limit."""
    for start_n in range(lo, hi, BLOCK_N):
        k1, k2, v, offs_n, key_ok = _load_k_block(k_base, stride_kh, stride_kt, v_base, stride_vt, start_n, lk,
                                                  MASKED, HEAD_DIM, BLOCK_N)
        visible = key_ok[None, :]
        if CAUSAL:  # bottom-right aligned: row r sees keys up to r + shift
            visible = visible & ((offs_m[:, None] + shift) >= offs_n[None, :])
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, k1, k2, v, visible, qk_scale, do_scale,
                             MASKED, DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _varlen_dq_kernel(
    Q, K, V, DO, LSE, DELTA, LAM, DQ, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt, stride_lh,
    stride_dqt, stride_dqh,
    GROUP, TOTAL_Q, qk_scale, sm_scale, do_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    q0, lq, k0, lk = _seq_bounds(CU_Q, CU_K, b)
    if start_m < lq:
        q1, q2, do, lse1, lse2, d1, d2, lam, offs_m = _load_q_block(
            Q + q0 * stride_qt + (2 * h) * stride_qh, stride_qh, stride_qt, DO + q0 * stride_ot + h * stride_oh,
            stride_ot, LSE, DELTA, (2 * h) * TOTAL_Q + q0, LAM + q0 * stride_lt + h * stride_lh, stride_lt,
            start_m, lq, TOTAL_Q, HEAD_DIM, BLOCK_M)
        g = h // GROUP
        k_base = K + k0 * stride_kt + (2 * g) * stride_kh
        v_base = V + k0 * stride_vt + g * stride_vh
        shift = lk - lq
        hi = lk
        if CAUSAL:
            hi = tl.maximum(tl.minimum(lk, start_m + BLOCK_M + shift), 0)
        mid = _unmasked_end(0, hi, start_m + shift, CAUSAL, BLOCK_N)  # the block's first row sees keys <= that
        dq1 = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dq2 = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dq1, dq2 = _dq_steps(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, k_base, stride_kh, stride_kt,
                             v_base, stride_vt, 0, mid, lk, shift, qk_scale, do_scale, False, CAUSAL, HEAD_DIM,
                             BLOCK_N, DOT_PRECISION)
        dq1, dq2 = _dq_steps(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, k_base, stride_kh, stride_kt,
                             v_base, stride_vt, mid, hi, lk, shift, qk_scale, do_scale, True, CAUSAL, HEAD_DIM,
                             BLOCK_N, DOT_PRECISION)
        m64 = offs_m.to(tl.int64)
        dq_ptrs = DQ + q0 * stride_dqt + (2 * h) * stride_dqh + (m64[:, None] * stride_dqt
                                                                + tl.arange(0, HEAD_DIM)[None, :])
        q_ok = offs_m < lq
        tl.store(dq_ptrs, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])
        tl.store(dq_ptrs + stride_dqh, (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


def varlen_bwd(dout, q, k, v, lam_th, norm_weight, o_ref, o2, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, *,
               causal, scale, norm_eps, out_scale, needs_dlam, needs_dw):
    """(dq, dk, dv, dlam (total_q, H) or None, dnorm_weight or None). `o_ref`: the forward's output, or the
    pre-norm difference (H, total_q, 2d) with the norm."""
    total_q, H2, d = q.shape
    H, Hkv = H2 // 2, k.shape[1] // 2
    batch = cu_q.shape[0] - 1
    dq, dk, dv = alloc.empty_like(q), alloc.empty_like(k), alloc.empty_like(v)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    has_norm = norm_weight is not None
    # The dense preprocess on the packed batch seen as one (1, H, total_q, ·) sequence.
    dout4 = dout.permute(1, 0, 2).unsqueeze(0)
    oref4 = (o_ref if has_norm else o_ref.permute(1, 0, 2)).unsqueeze(0)
    lam4 = torch.broadcast_to(lam_th, (total_q, H)).t().unsqueeze(0)
    pre_m = pre_block_m(2 * d)
    n_pre = cdiv(total_q, pre_m)
    delta = alloc.empty(H2, total_q, dtype=torch.float32, device=q.device)
    do = alloc.empty(H, total_q, 2 * d, dtype=q.dtype, device=q.device) if has_norm else None
    dw_part = alloc.empty(n_pre * H, 2 * d, dtype=torch.float32, device=q.device) if has_norm and needs_dw else None
    dlam = alloc.empty(H, total_q, dtype=torch.float32, device=q.device) if needs_dlam else None
    if total_q == 0 or batch == 0:
        dk.zero_()
        dv.zero_()
        dw = torch.zeros_like(norm_weight) if has_norm and needs_dw else None
        return dq, dk, dv, (dlam.t() if dlam is not None else None), dw
    if k.shape[0] > 0 and max_seqlen_k == 0:  # keys outside every sequence get no gradient
        dk.zero_()
        dv.zero_()
    # With the norm the main kernels read the epilogue's gradient (H, total_q, 2d); without it dout itself.
    g, do_scale = (do, 1.0) if has_norm else (dout, out_scale)
    g_t, g_h = (g.stride(1), g.stride(0)) if has_norm else (g.stride(0), g.stride(1))
    lam_b = torch.broadcast_to(lam_th, (total_q, H))
    strides = (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], g_t, g_h, *lam_b.stride())
    sm = device_sm(q.device)
    common = dict(HEAD_DIM=d, CAUSAL=causal, DOT_PRECISION=dot_precision(q.dtype))
    scalars = (H // Hkv, total_q, scale * LOG2E, scale, do_scale)
    with device_guard(q.device):
        _bwd_preprocess_kernel[(n_pre * H,)](
            dout4, oref4, o2, lam4, norm_weight, do, delta, dw_part, dlam,
            *dout4.stride(), *oref4.stride(), *lam4.stride(), norm_weight.stride(0) if has_norm else 0,
            H, total_q, norm_eps, out_scale,
            WIDTH=2 * d, HAS_NORM=has_norm, NEED_DW=dw_part is not None, NEED_DLAM=needs_dlam, BLOCK_M=pre_m,
        )
        if k.shape[0] > 0 and max_seqlen_k > 0:
            cfg = lm_config("varlen_dkdv", d, q.element_size(), sm)
            _varlen_dkdv_kernel[(cdiv(max_seqlen_k, cfg.kwargs["BLOCK_N"]), batch, Hkv)](
                q, k, v, g, lse, delta, lam_b, dk, dv, cu_q, cu_k, *strides, *dk.stride()[:2], *dv.stride()[:2],
                *scalars, **common, **cfg.all_kwargs())
        if max_seqlen_q > 0:
            cfg = lm_config("varlen_dq", d, q.element_size(), sm)
            _varlen_dq_kernel[(cdiv(max_seqlen_q, cfg.kwargs["BLOCK_M"]), batch, H)](
                q, k, v, g, lse, delta, lam_b, dq, cu_q, cu_k, *strides, *dq.stride()[:2], *scalars, **common,
                **cfg.all_kwargs())
    dw = dw_part.sum(0).to(norm_weight.dtype) if dw_part is not None else None
    return dq, dk, dv, (dlam.t() if dlam is not None else None), dw
