"""The backward's shared steps: row loads, the dK/dV and dQ inner loops and one program of each (a key block's dK/dV,
a query block's dQ). The kernels that run them are thin wrappers: `bwd.py` (one launch each) and `bwd_fused.py`
(both in one launch, or dK/dV with atomic dQ). The formulas are in `bwd.py`'s docstring. One copy of each piece of
the math lives here; every kernel calls these.

Head layouts and GQA (kernels/layouts.py): map 2's query/key heads lie one pair offset (stride_qp, stride_kp) after
map 1's; a value row's two d-wide halves one split offset (stride_vs) apart (`fwd._value_cols`); V_WIDTH is the
value/output width (2d; d for v2), SHARED_K (v2) means both maps read one key head (loaded once; its gradient is
dK1 + dK2, accumulated in one fp32 tile). A dK/dV program owns a key block of one key/value group and loops over
the group's GROUP diff-heads in a fixed order (no atomics: deterministic); a dQ program owns a query block of one
diff-head and reads its group h // GROUP.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import _value_cols


@triton.jit
def _load_query_rows(q_base, stride_qp, stride_qn, stride_qd, do_base, stride_on, stride_od, LSE, DELTA, row_base,
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
    q2 = tl.load(q_ptrs + stride_qp, mask=q_ok[:, None], other=0.0)
    do = tl.load(do_base + (offs_m.to(tl.int64)[:, None] * stride_on + offs_dv[None, :] * stride_od),
                 mask=q_ok[:, None], other=0.0)
    lse1 = tl.load(LSE + row_base + r64 + rows, mask=q_ok, other=float("inf"))
    lse2 = tl.load(LSE + row_base + N + r64 + rows, mask=q_ok, other=float("inf"))
    d1 = tl.load(DELTA + row_base + r64 + rows, mask=q_ok, other=0.0)
    d2 = tl.load(DELTA + row_base + N + r64 + rows, mask=q_ok, other=0.0)
    lam = tl.load(lam_base + r64 * stride_ln + rows * stride_ln, mask=q_ok, other=0.0).to(tl.float32)
    return q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, q_ok


@triton.jit
def _load_key_rows(k_base, stride_kp, stride_kn, stride_kd, v_base, stride_vs, stride_vn, stride_vd, start_n, offs_d,
                   offs_dv, N, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr,
                   SHARED_K: tl.constexpr, V_SPLIT: tl.constexpr):
    """K1, K2 and V rows from `start_n` of one key/value group (zeros past N), their indices and the in-sequence
    mask (SHARED_K: K2 is K1). 64-bit row offsets, as in `_load_query_rows`."""
    keys = tl.arange(0, BLOCK_N)
    offs_n = start_n + keys
    key_ok = offs_n < N
    k_ptrs = k_base + (offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd)
    k1 = tl.load(k_ptrs, mask=key_ok[:, None], other=0.0)
    if SHARED_K:
        k2 = k1
    else:
        k2 = tl.load(k_ptrs + stride_kp, mask=key_ok[:, None], other=0.0)
    v_cols = _value_cols(offs_dv, stride_vd, stride_vs, HEAD_DIM, V_SPLIT)
    v = tl.load(v_base + (offs_n.to(tl.int64)[:, None] * stride_vn + v_cols[None, :]), mask=key_ok[:, None],
                other=0.0)
    return k1, k2, v, offs_n, key_ok


@triton.jit
def _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, q_base, stride_qp, stride_qn, stride_qd, do_base, stride_on,
                stride_od, LSE, DELTA, row_base, lam_base, stride_ln, offs_d, offs_dv, N, lo, hi, qk_scale, do_scale,
                dq_base, stride_dqp, stride_dqn, stride_dqd, sm_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                DO_DK: tl.constexpr, DO_DV: tl.constexpr, DQ_ATOMIC: tl.constexpr, MASK_KEYS: tl.constexpr,
                SHARED_K: tl.constexpr):
    """Fold query blocks [lo, hi) of one diff-head into one key block's dK1, dK2 (DO_DK) and dV (DO_DV) (keys along
    rows: no transposes). SHARED_K: both maps' shares go to dk1 (the one key head's gradient; dk2 is untouched).

    Only MASKED blocks (the causal diagonal) build a mask. Query rows past N need none: they read lse = +inf, so
    their probabilities are exactly 0. Key rows past N need none either: each accumulator row belongs to one key,
    and rows past N are never stored.

    DQ_ATOMIC (the opt-in atomic form, `bwd_fused.py`): also add this key block's share of dQ1, dQ2 (s·dSᵀ·K, fp32)
    to `dq_base` with atomic adds, so no other program recomputes the maps for dQ. Then a key past N does matter
    (its p = exp(-lse) can overflow to inf, and inf·0 = NaN in dSᵀ·K): MASK_KEYS masks them (non-causal only; a
    causal key past N is hidden from every real query by the diagonal mask).
    """
    for start_m in range(lo, hi, BLOCK_M):
        q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, q_ok = _load_query_rows(
            q_base, stride_qp, stride_qn, stride_qd, do_base, stride_on, stride_od, LSE, DELTA, row_base,
            lam_base, stride_ln, start_m, offs_d, offs_dv, N, BLOCK_M)
        p1t = tl.math.exp2(tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION) * qk_scale - lse1[None, :])
        p2t = tl.math.exp2(tl.dot(k2, tl.trans(q2), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
        if MASKED:
            visible = offs_m[None, :] >= offs_n[:, None]
            p1t = tl.where(visible, p1t, 0.0)
            p2t = tl.where(visible, p2t, 0.0)
        if MASK_KEYS:
            p1t = tl.where(offs_n[:, None] < N, p1t, 0.0)
            p2t = tl.where(offs_n[:, None] < N, p2t, 0.0)
        if DO_DV:
            dv = tl.dot((p1t - lam[None, :] * p2t).to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if DO_DK:
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) * do_scale
            ds1t = p1t * (dpt - d1[None, :])
            ds2t = -lam[None, :] * p2t * (dpt - d2[None, :])
            ds1t = ds1t.to(q1.dtype)
            ds2t = ds2t.to(q2.dtype)
            dk1 = tl.dot(ds1t, q1, dk1, input_precision=DOT_PRECISION)
            if SHARED_K:
                dk1 = tl.dot(ds2t, q2, dk1, input_precision=DOT_PRECISION)
            else:
                dk2 = tl.dot(ds2t, q2, dk2, input_precision=DOT_PRECISION)
            if DQ_ATOMIC:
                dq_ptrs = dq_base + (offs_m.to(tl.int64)[:, None] * stride_dqn + offs_d[None, :] * stride_dqd)
                tl.atomic_add(dq_ptrs, tl.dot(tl.trans(ds1t), k1, input_precision=DOT_PRECISION) * sm_scale,
                              mask=q_ok[:, None], sem="relaxed")
                tl.atomic_add(dq_ptrs + stride_dqp,
                              tl.dot(tl.trans(ds2t), k2, input_precision=DOT_PRECISION) * sm_scale,
                              mask=q_ok[:, None], sem="relaxed")
    return dk1, dk2, dv


@triton.jit
def _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, atomic_q, start_n, N, qk_scale, do_scale,
               CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               DO_DK: tl.constexpr, DO_DV: tl.constexpr, DQ_ATOMIC: tl.constexpr, SHARED_K: tl.constexpr,
               ONE_LOOP: tl.constexpr):
    """All query blocks that see this key block: the causal diagonal (masked), then the rest (unmasked). In the
    two-pass (split) form, and with ONE_LOOP (GQA: the loop over a group's diff-heads around it), causal runs one
    masked loop instead: the two loop bodies spill where one does not (as in varlen_bwd). `atomic_q` = (dQ pointer
    of the diff-head, its head/row/feature strides, s): read only with DQ_ATOMIC, in the pass that computes dK."""
    if CAUSAL and (ONE_LOOP or not (DO_DK and DO_DV)):
        lo = (start_n // BLOCK_M) * BLOCK_M
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, *common_q, lo, N, qk_scale, do_scale,
                                   *atomic_q, True, BLOCK_M, DOT_PRECISION, DO_DK, DO_DV, DQ_ATOMIC and DO_DK, False,
                                   SHARED_K)
        return dk1, dk2, dv
    if CAUSAL:
        # Queries before this key block never see it: start at the query block holding `start_n`. Query blocks
        # from `mid` on lie wholly below the diagonal and need no mask.
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, N)
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, *common_q, lo, mid, qk_scale, do_scale,
                                   *atomic_q, True, BLOCK_M, DOT_PRECISION, DO_DK, DO_DV, DQ_ATOMIC and DO_DK, False,
                                   SHARED_K)
    else:
        mid = 0
    dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, offs_n, *common_q, mid, N, qk_scale, do_scale, *atomic_q,
                               False, BLOCK_M, DOT_PRECISION, DO_DK, DO_DV, DQ_ATOMIC and DO_DK,
                               DQ_ATOMIC and DO_DK and not CAUSAL, SHARED_K)
    return dk1, dk2, dv


@triton.jit
def _store_dk(DK, dk1, dk2, b, g, start_n, stride_dkb, stride_dkh, stride_dkp, stride_dkn, stride_dkd, offs_d, key_ok,
              sm_scale, BLOCK_N: tl.constexpr, SHARED_K: tl.constexpr):
    keys = tl.arange(0, BLOCK_N)
    dk_ptrs = (DK + b * stride_dkb + g * stride_dkh + start_n.to(tl.int64) * stride_dkn
               + (keys[:, None] * stride_dkn + offs_d[None, :] * stride_dkd))
    tl.store(dk_ptrs, (dk1 * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])
    if not SHARED_K:  # SHARED_K: dk1 already holds dK1 + dK2 (fp32), stored once
        tl.store(dk_ptrs + stride_dkp, (dk2 * sm_scale).to(DK.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _query_side(heads, h):
    """What `_dkdv_pass` reads of diff-head h: (its query-side bases and strides, its atomic dQ target). `heads` is
    the program's fixed part (see `_dkdv_program`)."""
    (Q, DO, LAM, DQ, LSE, DELTA, b, H, N, stride_qb, stride_qh, stride_qp, stride_qn, stride_qd, stride_ob, stride_oh,
     stride_on, stride_od, stride_lb, stride_lh, stride_ln, stride_dqb, stride_dqh, stride_dqp, stride_dqn, stride_dqd,
     offs_d, offs_dv, sm_scale) = heads
    # LSE and DELTA rows of map 1; map 2 follows at +N. (Written (b·H + h)·2N: the equal (2bH + 2h)·N made ptxas 3.8
    # spill 4-24 B in the causal dK/dV rows 32x32 at d = 64 and 128 on sm_90; register allocation is that brittle.)
    row_base = (b * H + h) * (2 * N)
    common_q = (Q + b * stride_qb + h * stride_qh, stride_qp, stride_qn, stride_qd,
                DO + b * stride_ob + h * stride_oh, stride_on, stride_od, LSE, DELTA, row_base,
                LAM + b * stride_lb + h * stride_lh, stride_ln, offs_d, offs_dv, N)
    atomic_q = (DQ + b * stride_dqb + h * stride_dqh, stride_dqp, stride_dqn, stride_dqd, sm_scale)
    return common_q, atomic_q


@triton.jit
def _dkdv_program(
    Q, K, V, DO, LSE, DELTA, LAM, DK, DV, DQ,
    stride_qb, stride_qh, stride_qp, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kp, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dkb, stride_dkh, stride_dkp, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqp, stride_dqn, stride_dqd,
    H, GROUP, N, qk_scale, sm_scale, do_scale, block_n, bg,
    HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr, SHARED_K: tl.constexpr, V_SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, DQ_ATOMIC: tl.constexpr, GQA: tl.constexpr,
):
    """dK1, dK2 and dV of key block `block_n` of (batch·group) `bg`: loops over the group's GROUP diff-heads, in
    order, and over the query blocks of each that see the block; the group's sums stay in registers and are stored
    once. Works transposed (keys along rows) so that dK1, dK2 and dV accumulate without a transpose.

    SPLIT: two passes over the queries, dK1/dK2 first (stored), then dV. Only 2d fp32 accumulator columns are live
    at a time instead of 4d, which lets d = 128 use 64-key blocks (wgmma on Hopper) without spilling; the price is
    recomputing both maps (two QKᵀ and their exponentials) in the second pass.
    DQ_ATOMIC: the dK pass also adds this block's share of dQ to DQ (fp32, zeroed by the caller) atomically.
    GROUP == 1 (no GQA) is specialised by Triton: the one-trip head loops then fold away. GQA (GROUP > 1, a flag of
    its own because GROUP is a runtime int) runs the causal queries in one masked loop (`_dkdv_pass`)."""
    start_n = block_n * BLOCK_N
    hkv = H // GROUP
    b = (bg // hkv).to(tl.int64)
    g = (bg % hkv).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, V_WIDTH)
    k1, k2, v, offs_n, key_ok = _load_key_rows(K + b * stride_kb + g * stride_kh, stride_kp, stride_kn, stride_kd,
                                               V + b * stride_vb + g * stride_vh, stride_vs, stride_vn, stride_vd,
                                               start_n, offs_d, offs_dv, N, BLOCK_N, HEAD_DIM, V_WIDTH, SHARED_K,
                                               V_SPLIT)

    dk1 = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, V_WIDTH], dtype=tl.float32)
    heads = (Q, DO, LAM, DQ, LSE, DELTA, b, H, N, stride_qb, stride_qh, stride_qp, stride_qn, stride_qd, stride_ob,
             stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln, stride_dqb, stride_dqh, stride_dqp,
             stride_dqn, stride_dqd, offs_d, offs_dv, sm_scale)
    if SPLIT:
        for j in range(GROUP):
            common_q, atomic_q = _query_side(heads, g * GROUP + j)
            dk1, dk2, dv = _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, atomic_q, start_n, N, qk_scale,
                                      do_scale, CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, True, False, DQ_ATOMIC,
                                      SHARED_K, GQA)
        _store_dk(DK, dk1, dk2, b, g, start_n, stride_dkb, stride_dkh, stride_dkp, stride_dkn, stride_dkd, offs_d,
                  key_ok, sm_scale, BLOCK_N, SHARED_K)
        for j in range(GROUP):
            common_q, atomic_q = _query_side(heads, g * GROUP + j)
            dv = _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, atomic_q, start_n, N, qk_scale, do_scale,
                            CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, False, True, DQ_ATOMIC, SHARED_K, GQA)[2]
    else:
        for j in range(GROUP):
            common_q, atomic_q = _query_side(heads, g * GROUP + j)
            dk1, dk2, dv = _dkdv_pass(dk1, dk2, dv, k1, k2, v, offs_n, common_q, atomic_q, start_n, N, qk_scale,
                                      do_scale, CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, True, True, DQ_ATOMIC,
                                      SHARED_K, GQA)
        _store_dk(DK, dk1, dk2, b, g, start_n, stride_dkb, stride_dkh, stride_dkp, stride_dkn, stride_dkd, offs_d,
                  key_ok, sm_scale, BLOCK_N, SHARED_K)

    keys = tl.arange(0, BLOCK_N)
    n64 = start_n.to(tl.int64)
    dv_cols = _value_cols(offs_dv, stride_dvd, stride_dvs, HEAD_DIM, V_SPLIT)
    tl.store(DV + b * stride_dvb + g * stride_dvh + n64 * stride_dvn + (keys[:, None] * stride_dvn + dv_cols[None, :]),
             (dv * do_scale).to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _dq_inner(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, k_base, stride_kp, stride_kn, stride_kd,
              v_base, stride_vs, stride_vn, stride_vd, offs_d, offs_dv, N, lo, hi, qk_scale, do_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
              HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr, SHARED_K: tl.constexpr, V_SPLIT: tl.constexpr):
    """Fold key blocks [lo, hi) into one query block's dQ1, dQ2.

    MASKED blocks (the causal diagonal and the sequence tail) mask keys: a key past N would add p·0 to dQ, but its
    p = exp(-lse) can overflow to inf, and inf·0 is NaN. Query rows past N read lse = +inf (p = 0) and need none.
    """
    for start_n in range(lo, hi, BLOCK_N):
        k1, k2, v, offs_n, key_ok = _load_key_rows(k_base, stride_kp, stride_kn, stride_kd, v_base, stride_vs,
                                                   stride_vn, stride_vd, start_n, offs_d, offs_dv, N, BLOCK_N,
                                                   HEAD_DIM, V_WIDTH, SHARED_K, V_SPLIT)
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_m[:, None] >= offs_n[None, :])
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, k1, k2, v, visible, qk_scale, do_scale,
                             MASKED, DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _dq_block(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, k1, k2, v, visible, qk_scale, do_scale,
              MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block's share of a query block's dQ1, dQ2 (the dense and the varlen backward both fold with it):
    recompute P1, P2 from the saved log2-domain LSEs, dP = dO·Vᵀ shared by both maps, dS1 = P1(dP − Δ1),
    dS2 = −λP2(dP − Δ2). With MASKED, keys outside `visible` get p = 0 (the caller builds the mask)."""
    p1 = tl.math.exp2(tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION) * qk_scale - lse1[:, None])
    p2 = tl.math.exp2(tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p1 = tl.where(visible, p1, 0.0)
        p2 = tl.where(visible, p2, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) * do_scale
    ds1 = p1 * (dp - d1[:, None])
    ds2 = -lam[:, None] * p2 * (dp - d2[:, None])
    dq1 = tl.dot(ds1.to(k1.dtype), k1, dq1, input_precision=DOT_PRECISION)
    dq2 = tl.dot(ds2.to(k2.dtype), k2, dq2, input_precision=DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _dq_program(
    Q, K, V, DO, LSE, DELTA, LAM, DQ,
    stride_qb, stride_qh, stride_qp, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kp, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dqb, stride_dqh, stride_dqp, stride_dqn, stride_dqd,
    H, GROUP, N, qk_scale, sm_scale, do_scale, block_m, b, h,
    HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr, SHARED_K: tl.constexpr, V_SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ1, dQ2 of query block `block_m` (BLOCK_M rows) of batch `b`, diff-head `h` (int64): loops over the key
    blocks (BLOCK_N keys each) of its group h // GROUP that its rows see."""
    start_m = block_m * BLOCK_M
    g = h // GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, V_WIDTH)
    row_base = (b * 2 * H + 2 * h) * N
    q1, q2, do, lse1, lse2, d1, d2, lam, offs_m, q_ok = _load_query_rows(
        Q + b * stride_qb + h * stride_qh, stride_qp, stride_qn, stride_qd,
        DO + b * stride_ob + h * stride_oh, stride_on, stride_od, LSE, DELTA, row_base,
        LAM + b * stride_lb + h * stride_lh, stride_ln, start_m, offs_d, offs_dv, N, BLOCK_M)

    dq1 = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    # Keys below `lo` are visible to every row of the block and exist: no mask. [lo, hi) holds the causal
    # diagonal or the sequence tail; causal programs skip key blocks past their last row.
    if CAUSAL:
        lo = (start_m // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M, N)
    else:
        lo = (N // BLOCK_N) * BLOCK_N
        hi = N
    common = (offs_m, k_base, stride_kp, stride_kn, stride_kd, v_base, stride_vs, stride_vn, stride_vd, offs_d,
              offs_dv, N)
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, *common, 0, lo, qk_scale, do_scale,
                         False, CAUSAL, BLOCK_N, DOT_PRECISION, HEAD_DIM, V_WIDTH, SHARED_K, V_SPLIT)
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse1, lse2, d1, d2, lam, *common, lo, hi, qk_scale, do_scale,
                         True, CAUSAL, BLOCK_N, DOT_PRECISION, HEAD_DIM, V_WIDTH, SHARED_K, V_SPLIT)

    rows = tl.arange(0, BLOCK_M)
    dq_ptrs = (DQ + b * stride_dqb + h * stride_dqh + start_m.to(tl.int64) * stride_dqn
               + (rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd))
    tl.store(dq_ptrs, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])
    tl.store(dq_ptrs + stride_dqp, (dq2 * sm_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])
