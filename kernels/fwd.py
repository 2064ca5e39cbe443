"""Fused differential-attention forward: both softmax maps and their λ-difference in one tiled pass.

Layout: jit kernels (inner loop, then the program) -> launch helper. The autograd wrapper lives in `ops.py`.

One program owns BLOCK_M query rows of one diff-head h, which reads key/value group g = h // GROUP (GROUP = H / Hkv;
1 without GQA; in the interleaved layout query heads 2h, 2h+1, key heads 2g, 2g+1, value head g; the other head
layouts are strides: kernels/layouts.py). It loads its two query tiles once, then streams the K1, K2 and V tiles of
every key block once (SHARED_K, the v2 layout: one K tile serves both maps), keeping two online-softmax states
(running max m and sum l, in the log2 domain) and two fp32 accumulators of width V_WIDTH (2d; d for v2). The
diff-heads of a group are consecutive programs' heads, so their shared K/V tiles come from L2. The difference
``acc1/l1 − λ·acc2/l2`` is taken in fp32 before the single down-cast; the optional RMS-norm epilogue also runs in
fp32 on that row.

SPLIT rows (long sequences, kernels/configs.py) run the one-accumulator form of the same program: two passes over
the keys, map 2 then map 1, each a plain flash-attention loop with one fp32 accumulator of width 2d; map 2's
output O2 waits in an fp32 scratch buffer (global memory only this program touches, so it stays in L2) until the
shared epilogue reads it back. Same executed FLOPs and exponentials as the fused form, V streamed
twice instead of once, and half the accumulator registers, which buys wider blocks (128×128 at d = 64, 128-row
blocks at d = 128). Every step is the same arithmetic in the same order as the fused form, so both forms give the
same values for the same block shape (bit for bit under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import alloc
from .configs import (PRUNE, Problem, autotune_configs, cdiv, device_sm, fwd_may_split, grid_bucket, launch,
                      recorded_config, seqlen_bucket)
from .layouts import kv_heads, pair_strides, value_strides, value_width
from .runtime import device_guard

LOG2E = 1.4426950408889634


@triton.jit
def _block_and_head(N, BLOCK: tl.constexpr, HEAVIEST_FIRST: tl.constexpr):
    """1-D grid of cdiv(N, BLOCK)·B·H programs: program p takes row block p % nb of (batch·head) p // nb.
    Consecutive programs share a head, so its K/V stay in L2, and B·H is not capped by a grid axis limit.
    HEAVIEST_FIRST (causal row blocks, whose work grows with the block index) runs a head's last block first,
    so the light blocks fill the final wave instead of the heavy ones."""
    pid = tl.program_id(0)
    nb = tl.cdiv(N, BLOCK)
    blk = pid % nb
    if HEAVIEST_FIRST:
        blk = nb - 1 - blk
    return blk, pid // nb


@triton.jit
def _online_softmax_step(acc, m, l, q, k, v, visible, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold one key block into one map's online-softmax state (running max m and sum l in the log2 domain, fp32
    accumulator acc of width 2d). Called once per map with the same K-block shape and the shared V tile."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    if MASKED:  # a row with no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l


@triton.jit
def _fresh_state(BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """One map's online-softmax state before any key: running max -inf, sum 0, accumulator 0."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    return m, tl.zeros([BLOCK_M], dtype=tl.float32), tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)


@triton.jit
def _fwd_inner(
    acc1, acc2, m1, m2, l1, l2,
    q1, q2,
    k1_base, k2_base, v_base, k_tile, v_tile,
    stride_kn, stride_vn,
    offs_m, lo, hi, N, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BOTH: tl.constexpr, SHARED_K: tl.constexpr,
):
    """Fold key blocks [lo, hi) into both online-softmax states; K1, K2 and V tiles are each loaded once (SHARED_K:
    K2 is K1, not loaded again).
    BOTH=False (the SPLIT form's passes) folds map 1's state only (acc1, m1, l1 with q1 and K1); the second
    state's arguments are then placeholders, returned unchanged.

    MASKED=False is the hot path: every key in the range exists and is visible to every row of the block, so no
    mask is built. MASKED=True handles the sequence tail and the causal diagonal.
    Addresses: a 64-bit scalar block start (start_n·stride, which can pass 2^31 on long sequences) plus the
    int32 in-tile offsets k_tile / v_tile, computed once.
    """
    for start_n in range(lo, hi, BLOCK_N):
        row = tl.cast(start_n, tl.int64)  # a plain int under the interpreter
        k1_ptrs = k1_base + row * stride_kn + k_tile
        k2_ptrs = k2_base + row * stride_kn + k_tile
        v_ptrs = v_base + row * stride_vn + v_tile
        if MASKED:
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_seq = offs_n < N
            k1 = tl.load(k1_ptrs, mask=in_seq[:, None], other=0.0)
            if SHARED_K:
                k2 = k1
            elif BOTH:
                k2 = tl.load(k2_ptrs, mask=in_seq[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=in_seq[:, None], other=0.0)
            visible = in_seq[None, :]
            if CAUSAL:
                visible = visible & (offs_m[:, None] >= offs_n[None, :])
        else:
            k1 = tl.load(k1_ptrs)
            if SHARED_K:
                k2 = k1
            elif BOTH:
                k2 = tl.load(k2_ptrs)
            v = tl.load(v_ptrs)
            visible = 0  # unused when not MASKED
        acc1, m1, l1 = _online_softmax_step(acc1, m1, l1, q1, k1, v, visible, qk_scale, MASKED, DOT_PRECISION)
        if BOTH:
            acc2, m2, l2 = _online_softmax_step(acc2, m2, l2, q2, k2, v, visible, qk_scale, MASKED, DOT_PRECISION)
    return acc1, acc2, m1, m2, l1, l2


@triton.jit
def _fwd_keys(
    acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k2_base, v_base, k_tile, v_tile, stride_kn, stride_vn,
    offs_m, row0, N, qk_scale,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BOTH: tl.constexpr, SHARED_K: tl.constexpr,
):
    """Every key block a row block sees: key blocks below `lo` need no mask; [lo, hi) holds the sequence tail (and,
    when causal, the diagonal). Causal programs never visit key blocks above their last row: those are skipped, not
    masked."""
    if CAUSAL:
        lo = row0
        hi = tl.minimum(row0 + BLOCK_M, N)
    else:
        lo = (N // BLOCK_N) * BLOCK_N
        hi = N
    acc1, acc2, m1, m2, l1, l2 = _fwd_inner(
        acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k2_base, v_base, k_tile, v_tile,
        stride_kn, stride_vn, offs_m, 0, lo, N, qk_scale, False, CAUSAL, BLOCK_N, DOT_PRECISION, BOTH, SHARED_K,
    )
    return _fwd_inner(
        acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k2_base, v_base, k_tile, v_tile,
        stride_kn, stride_vn, offs_m, lo, hi, N, qk_scale, True, CAUSAL, BLOCK_N, DOT_PRECISION, BOTH, SHARED_K,
    )


@triton.jit
def _value_cols(offs_dv, stride_vd, stride_vs, HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr):
    """In-tile offsets of a value row's columns c < V_WIDTH: (c mod d)·stride_d + (c div d)·split, the two d-wide
    halves `split` apart (kernels/layouts.py). HEAD_DIM is a power of two, so this is a mask and a shift, and each
    half stays contiguous (vectorised loads). One half only (v2): c·stride_d."""
    if V_WIDTH == HEAD_DIM:
        return offs_dv * stride_vd
    return (offs_dv % HEAD_DIM) * stride_vd + (offs_dv // HEAD_DIM) * stride_vs


@triton.jit
def _diff_attn_fwd_kernel(
    Q, K, V, LAM, NORM_W, OUT, LSE, O2, OPRE, O2F,
    stride_qb, stride_qh, stride_qp, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kp, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vn, stride_vd,
    stride_lb, stride_lh, stride_ln,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_w,
    H, GROUP, N, N_BUCKET, GRID_BUCKET, qk_scale, norm_eps, out_scale,
    HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr, SHARED_K: tl.constexpr, CAUSAL: tl.constexpr, HAS_NORM: tl.constexpr, SAVE_FOR_BWD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ARCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr = False,
):
    # The causal split below walks [0, row0) in whole key blocks: row0 must be a multiple of BLOCK_N.
    tl.static_assert(not CAUSAL or BLOCK_M % BLOCK_N == 0, "causal forward needs BLOCK_M % BLOCK_N == 0")
    start_m, bh = _block_and_head(N, BLOCK_M, CAUSAL)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP  # its key/value group (GROUP == 1 is specialised by Triton: this folds away)

    # Addresses are a 64-bit scalar base per block (batch, head and first row) plus int32 in-tile offsets;
    # validate.py bounds the strides so that the in-tile part cannot pass 2^31.
    row0 = start_m * BLOCK_M
    row0_64 = row0.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_m = row0 + rows
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, V_WIDTH)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_m < N

    # Map 2's query/key heads lie one pair offset (stride_qp / stride_kp) after map 1's (kernels/layouts.py).
    q1_base = Q + b * stride_qb + h * stride_qh + row0_64 * stride_qn
    k1_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    q_tile = rows[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_tile = offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_tile = offs_n[:, None] * stride_vn + _value_cols(offs_dv, stride_vd, stride_vs, HEAD_DIM, V_WIDTH)[None, :]
    k2_base = k1_base + stride_kp
    # The saved (B, H, N, V_WIDTH) buffers (and the SPLIT form's fp32 scratch) are contiguous.
    sav_base = ((b * H + h) * N + row0_64) * V_WIDTH
    sav_tile = rows[:, None] * V_WIDTH + offs_dv[None, :]

    if SPLIT:
        # One fp32 accumulator live at a time: map 2 first (its output O2, fp32, parked in the scratch O2F: global
        # memory this program alone touches, L2-resident), then map 1, then the same epilogue.
        q2 = tl.load(q1_base + stride_qp + q_tile, mask=row_ok[:, None], other=0.0)
        m2, l2, acc2 = _fresh_state(BLOCK_M, V_WIDTH)
        acc2, _a, m2, _m, l2, _l = _fwd_keys(  # the second slot is a placeholder (BOTH=False)
            acc2, acc2, m2, m2, l2, l2, q2, q2, k2_base, k2_base, v_base, k_tile, v_tile, stride_kn, stride_vn,
            offs_m, row0, N, qk_scale, CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, False, False,
        )
        acc2 = acc2 * (1.0 / tl.where(l2 > 0, l2, 1.0))[:, None]  # = O2, as in the fused epilogue below
        if SAVE_FOR_BWD:
            tl.store(O2 + sav_base + sav_tile, acc2.to(O2.dtype.element_ty), mask=row_ok[:, None])
        tl.store(O2F + sav_base + sav_tile, acc2, mask=row_ok[:, None])
        tl.debug_barrier()  # other threads of this program read these values back in the epilogue
        q1 = tl.load(q1_base + q_tile, mask=row_ok[:, None], other=0.0)
        m1, l1, acc1 = _fresh_state(BLOCK_M, V_WIDTH)
        acc1, _a, m1, _m, l1, _l = _fwd_keys(
            acc1, acc1, m1, m1, l1, l1, q1, q1, k1_base, k1_base, v_base, k_tile, v_tile, stride_kn, stride_vn,
            offs_m, row0, N, qk_scale, CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, False, False,
        )
    else:
        q1 = tl.load(q1_base + q_tile, mask=row_ok[:, None], other=0.0)
        q2 = tl.load(q1_base + stride_qp + q_tile, mask=row_ok[:, None], other=0.0)
        m1, l1, acc1 = _fresh_state(BLOCK_M, V_WIDTH)
        m2, l2, acc2 = _fresh_state(BLOCK_M, V_WIDTH)
        acc1, acc2, m1, m2, l1, l2 = _fwd_keys(
            acc1, acc2, m1, m2, l1, l2, q1, q2, k1_base, k2_base, v_base, k_tile, v_tile, stride_kn, stride_vn,
            offs_m, row0, N, qk_scale, CAUSAL, BLOCK_M, BLOCK_N, DOT_PRECISION, True, SHARED_K,
        )

    # Epilogue. Ordered so that few (BLOCK_M, V_WIDTH) fp32 tiles are live at once: O2 is finished (and saved) first,
    # then folded into the difference in place.
    # A row whose keys are all masked has l == 0: it outputs 0 instead of 0/0.
    has1 = l1 > 0
    has2 = l2 > 0
    if not SPLIT:
        acc2 = acc2 * (1.0 / tl.where(has2, l2, 1.0))[:, None]  # = O2
        if SAVE_FOR_BWD:
            tl.store(O2 + sav_base + sav_tile, acc2.to(O2.dtype.element_ty), mask=row_ok[:, None])
    lam = tl.load(LAM + b * stride_lb + h * stride_lh + row0_64 * stride_ln + rows * stride_ln, mask=row_ok,
                  other=0.0).to(tl.float32)
    # o = O1 − λ·O2 in fp32, before any down-cast (SPLIT: O2 read back from the scratch only here, so that it and
    # acc1 are live together as briefly as possible)
    acc1 = acc1 * (1.0 / tl.where(has1, l1, 1.0))[:, None]
    if SPLIT:
        acc1 -= lam[:, None] * tl.load(O2F + sav_base + sav_tile, mask=row_ok[:, None], other=0.0)
    else:
        acc1 -= lam[:, None] * acc2

    out_ptrs = (OUT + b * stride_ob + h * stride_oh + row0_64 * stride_on
                + (rows[:, None] * stride_on + offs_dv[None, :] * stride_od))
    if HAS_NORM:
        if SAVE_FOR_BWD:
            tl.store(OPRE + sav_base + sav_tile, acc1.to(OPRE.dtype.element_ty), mask=row_ok[:, None])
        rstd = tl.math.rsqrt(tl.sum(acc1 * acc1, 1) / V_WIDTH + norm_eps)
        w = tl.load(NORM_W + offs_dv * stride_w).to(tl.float32)
        acc1 = acc1 * rstd[:, None] * (w * out_scale)[None, :]
    else:
        acc1 = acc1 * out_scale
    tl.store(out_ptrs, acc1.to(OUT.dtype.element_ty), mask=row_ok[:, None])

    if SAVE_FOR_BWD:
        # Per-row log-sum-exps of both maps in the log2 domain of the scaled scores (m + log2 l), (B, 2H, N) indexed
        # like the query heads: the backward's exp2(s·log2e − lse) needs no conversion. Rows without keys get +inf
        # so that the backward's probabilities are 0 there.
        lse1 = tl.where(has1, m1 + tl.math.log2(tl.where(has1, l1, 1.0)), float("inf"))
        lse2 = tl.where(has2, m2 + tl.math.log2(tl.where(has2, l2, 1.0)), float("inf"))
        lse_base = LSE + (b * 2 * H + 2 * h) * N + row0_64
        tl.store(lse_base + rows, lse1, mask=row_ok)
        tl.store(lse_base + N + rows, lse2, mask=row_ok)


# V_WIDTH and SHARED_K (the v2 layout) change the kernel, so they are in the key. GROUP (GQA) is not: it only
# changes which K/V head a program reads (neighbouring programs then share K/V in L2), not its work or registers
# (GROUP == 1 is a separate specialisation that Triton compiles anyway).
# HAS_NORM is passed explicitly (not derived by @triton.heuristics): the autotuner reads its key before heuristics
# run, so a derived flag would be missing from the key. ARCH (compute capability x10; unused by the code) keys the
# choice by architecture: in a process with an sm_80 and an sm_90 GPU, a Hopper-only row tuned on one must not be
# reused on the other. SAVE_FOR_BWD is deliberately not in the key: the training and the inference forward share
# one choice per problem (configs.launch), so that both give the same bits.
_diff_attn_fwd = triton.autotune(
    configs=autotune_configs("fwd"),
    key=["N_BUCKET", "GRID_BUCKET", "HEAD_DIM", "V_WIDTH", "SHARED_K", "CAUSAL", "HAS_NORM", "ARCH"],
    prune_configs_by={"early_config_prune": PRUNE["fwd"]},
)(_diff_attn_fwd_kernel)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (PyTorch's default for matmul); fp16/bf16 use tensor cores as usual.
    return "ieee" if dtype == torch.float32 else "tf32"


def diff_attn_fwd(q, k, v, lam_bhn, norm_weight, *, causal, scale, norm_eps, out_scale, save_for_bwd,
                  head_layout="interleaved"):
    """Launch the forward kernel. Arguments are already validated (see `validate.py`).

    Returns ``(out, lse, o2, o_pre)``. `out` is (B, H, N, w) (w = 2d; d for the v2 layout), a transposed view of a
    (B, N, H, w) buffer so that the model's ``out.transpose(1, 2).reshape(B, N, H * w)`` is free. The others are
    None unless `save_for_bwd`: lse (B, 2H, N) fp32, log2 domain of the scaled scores (rows 2h, 2h+1: diff-head
    h's two maps, whatever the head layout); o2 (B, H, N, w) the second map's output; o_pre the pre-norm
    difference (only with the norm epilogue; otherwise `out` itself is the pre-norm difference).
    """
    B, H2, N, d = q.shape
    H = H2 // 2
    hkv = kv_heads(k, head_layout)
    width = value_width(d, head_layout)
    out = alloc.empty(B, N, H, width, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = o2 = o_pre = None
    if save_for_bwd:
        lse = alloc.empty(B, H2, N, dtype=torch.float32, device=q.device)
        o2 = alloc.empty(B, H, N, width, dtype=q.dtype, device=q.device)
        if norm_weight is not None:
            o_pre = alloc.empty(B, H, N, width, dtype=q.dtype, device=q.device)

    problem = Problem(d, q.element_size(), causal, N, device_sm(q.device))

    def grid(meta):
        return (cdiv(N, meta["BLOCK_M"]) * B * H,)

    args = [
        q, k, v, lam_bhn, norm_weight, out, lse, o2, o_pre, None,  # [9]: the SPLIT scratch, decided below
        *pair_strides(q, head_layout, H), *pair_strides(k, head_layout, hkv, key=True),
        *value_strides(v, head_layout, hkv), *lam_bhn.stride(), *out.stride(),
        norm_weight.stride(0) if norm_weight is not None else 0,
        H, H // hkv, N, seqlen_bucket(N), grid_bucket(B, H, N), scale * LOG2E, norm_eps, out_scale,
    ]
    kwargs = dict(HEAD_DIM=d, V_WIDTH=width, SHARED_K=head_layout == "v2", CAUSAL=causal, HAS_NORM=norm_weight is not None, SAVE_FOR_BWD=save_for_bwd,
                  DOT_PRECISION=dot_precision(q.dtype), ARCH=problem.sm)
    # The SPLIT form's fp32 scratch (map 2's accumulator, B·H·N·2d fp32: 268 MB at B=4 H=16 N=4096 d=64), allocated
    # only when a SPLIT row may run: once this key is tuned, only if the tuned row is one.
    if fwd_may_split(problem) and fwd_may_split(problem, recorded_config("fwd", _diff_attn_fwd, args, kwargs)):
        args[9] = alloc.empty(B, H, N, width, dtype=torch.float32, device=q.device)
    args = tuple(args)
    with device_guard(q.device):
        launch("fwd", _diff_attn_fwd, grid, args, kwargs, problem)
    return out, lse, o2, o_pre
