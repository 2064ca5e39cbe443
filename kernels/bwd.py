"""Fused differential-attention backward: no N x N tensor; three launches (preprocess, dK/dV, dQ) or two (preprocess,
then dK/dV and dQ in one launch: `bwd_fused.py`).

Layout: the dK/dV and dQ kernels (thin wrappers over the shared programs of `bwd_steps.py`; the preprocess kernel is
in `bwd_pre.py`, the fused one in `bwd_fused.py`) -> launch helper. Per diff-head, with
P1, P2 the two softmax maps, O1 = P1·V, O2 = P2·V, o = O1 − λ·O2 (before the epilogue) and dO = ∂L/∂o:

    Δ1 = rowsum(dO ⊙ O1) = rowsum(dO ⊙ o) + λ·Δ2,   Δ2 = rowsum(dO ⊙ O2),   ∂L/∂λ (per row) = −Δ2
    dP = dO·Vᵀ (one matmul, shared by both maps)
    dS1 = P1 ⊙ (dP − Δ1),   dS2 = −λ·P2 ⊙ (dP − Δ2)
    dQi = s·dSi·Ki,   dKi = s·dSiᵀ·Qi,   dV = (P1 − λ·P2)ᵀ·dO (one matmul on the combined map)

P1 and P2 are recomputed from the forward's per-row log-sum-exps. dK/dV and dQ are computed by separate programs
(one over key blocks, one over query blocks) so that every output element has exactly one writer: gradients are
bitwise deterministic. GQA: a dK/dV program owns a key block of one key/value group and sums the shares of the
group's H / Hkv diff-heads in registers, in a fixed order (no atomics), so dK/dV stay deterministic; the head layouts
(kernels/layouts.py) are strides and the V_WIDTH / SHARED_K / V_SPLIT flags (bwd_steps.py). The price is that the
dQ programs recompute both maps and dP (28 N²d matrix FLOPs per diff-head instead of 20, 4 exponentials per
(query, key) pair instead of 2). Backward forms (`configs.bwd_form`):

    separate  dK/dV and dQ kernels, one launch each (the default: the only form measured on a device so far)
    fused     one launch: each program does a key block's dK/dV, then the query block of the same index's dQ
              (Triton tutorial 06's order; causal work per program is then constant). Same FLOPs, one launch less.
    atomic    opt-in (DIFF_ATTN_BWD=atomic), never under deterministic mode: one launch, the dK/dV loop also adds
              dQ's share of each key block to an fp32 buffer with atomic adds: 20 N²d FLOPs, 2 exponentials per
              pair, but the summation order of dQ varies from run to run (not bitwise reproducible).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import alloc
from .bwd_fused import _bwd_atomic, _bwd_fused
from .bwd_pre import _bwd_preprocess_kernel
from .bwd_steps import _dkdv_program, _dq_program
from .configs import (PRUNE, Problem, autotune_configs, bwd_form, cdiv, device_sm, grid_bucket, launch,
                      pre_block_m, seqlen_bucket)
from .fwd import LOG2E, _block_and_head, dot_precision
from .layouts import kv_heads, pair_strides, value_split, value_strides, value_width
from .runtime import device_guard
from .validate import MAX_SPLIT_OFFSET, tile_strides_ok


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, LAM, DK, DV,
    stride_qb, stride_qh, stride_qp, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kp, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dkb, stride_dkh, stride_dkp, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvn, stride_dvd,
    H, GROUP, N, N_BUCKET, GRID_BUCKET, qk_scale, sm_scale, do_scale,
    HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr, SHARED_K: tl.constexpr, V_SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, ARCH: tl.constexpr, GQA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLIT: tl.constexpr = False,
):
    """One program: BLOCK_N keys of one key/value group, summed over its diff-heads (`_dkdv_program`). Causal key
    blocks are heaviest first already (block 0 is seen by every query). SPLIT (two passes, see `_dkdv_program`) is
    off by default, so that a config without the flag (e.g. one given to `force_configs`) launches the one-pass
    form."""
    block_n, bg = _block_and_head(N, BLOCK_N, False)
    _dkdv_program(Q, K, V, DO, LSE, DELTA, LAM, DK, DV, DK,
                  stride_qb, stride_qh, stride_qp, stride_qn, stride_qd, stride_kb, stride_kh, stride_kp, stride_kn,
                  stride_kd, stride_vb, stride_vh, stride_vs, stride_vn, stride_vd, stride_ob, stride_oh, stride_on,
                  stride_od, stride_lb, stride_lh, stride_ln, stride_dkb, stride_dkh, stride_dkp, stride_dkn,
                  stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvn, stride_dvd, stride_dkb, stride_dkh,
                  stride_dkp, stride_dkn, stride_dkd,
                  H, GROUP, N, qk_scale, sm_scale, do_scale, block_n, bg,
                  HEAD_DIM, V_WIDTH, SHARED_K, V_SPLIT, CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N, SPLIT, False, GQA)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, LAM, DQ,
    stride_qb, stride_qh, stride_qp, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kp, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dqb, stride_dqh, stride_dqp, stride_dqn, stride_dqd,
    H, GROUP, N, N_BUCKET, GRID_BUCKET, qk_scale, sm_scale, do_scale,
    HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr, SHARED_K: tl.constexpr, V_SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ARCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: BLOCK_M queries of one diff-head (`_dq_program`); causal: heaviest blocks first."""
    block_m, bh = _block_and_head(N, BLOCK_M, CAUSAL)
    _dq_program(Q, K, V, DO, LSE, DELTA, LAM, DQ,
                stride_qb, stride_qh, stride_qp, stride_qn, stride_qd, stride_kb, stride_kh, stride_kp, stride_kn,
                stride_kd, stride_vb, stride_vh, stride_vs, stride_vn, stride_vd, stride_ob, stride_oh, stride_on,
                stride_od, stride_lb, stride_lh, stride_ln, stride_dqb, stride_dqh, stride_dqp, stride_dqn, stride_dqd,
                H, GROUP, N, qk_scale, sm_scale, do_scale, block_m, (bh // H).to(tl.int64), (bh % H).to(tl.int64),
                HEAD_DIM, V_WIDTH, SHARED_K, V_SPLIT, CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N)


# ARCH, V_WIDTH, SHARED_K, V_SPLIT and why GROUP is not in the key: see the forward's key (fwd.py). GRID_BUCKET
# counts each launch's own programs (dK/dV: B·Hkv·blocks).
_KEY = ["N_BUCKET", "GRID_BUCKET", "HEAD_DIM", "V_WIDTH", "SHARED_K", "V_SPLIT", "CAUSAL", "ARCH"]
_bwd_dkdv = triton.autotune(configs=autotune_configs("dkdv"), key=_KEY + ["GQA"],
                            prune_configs_by={"early_config_prune": PRUNE["dkdv"]})(_bwd_dkdv_kernel)
_bwd_dq = triton.autotune(configs=autotune_configs("dq"), key=_KEY,
                          prune_configs_by={"early_config_prune": PRUNE["dq"]})(_bwd_dq_kernel)


def diff_attn_bwd(dout, q, k, v, lam_bhn, norm_weight, o_ref, o2, lse, *, causal, scale, norm_eps, out_scale,
                  needs_dlam, needs_dw, head_layout="interleaved"):
    """Gradients (dq, dk, dv, dlam_bhn, dnorm_weight); the last two are None when not needed; dk and dv have k's
    and v's shapes (summed over each key/value group's diff-heads). The backward form (separate, fused or atomic:
    see the module docstring) is `configs.bwd_form`'s.

    `o_ref` is the pre-norm difference when `norm_weight` is given, else the forward's output.
    """
    B, H2, N, d = q.shape
    H = H2 // 2
    hkv = kv_heads(k, head_layout)
    width = value_width(d, head_layout)
    if not tile_strides_ok(dout):  # an exotic incoming gradient layout: copy it rather than risk int32 offsets
        dout = dout.contiguous()
    has_norm = norm_weight is not None
    pre_m = pre_block_m(width)
    n_pre = cdiv(N, pre_m)
    delta = alloc.empty(B, H2, N, dtype=torch.float32, device=q.device)
    do = alloc.empty(B, H, N, width, dtype=q.dtype, device=q.device) if has_norm else None
    dw_part = alloc.empty(B * H * n_pre, width, dtype=torch.float32, device=q.device) if has_norm and needs_dw \
        else None
    dlam = alloc.empty(B, H, N, dtype=torch.float32, device=q.device) if needs_dlam else None
    # With the norm, the main kernels read the epilogue's gradient; without it, the incoming gradient itself
    # and apply out_scale (do_scale) inside.
    g, do_scale = (do, 1.0) if has_norm else (dout, out_scale)
    dq = alloc.empty_like(q)
    dk = alloc.empty_like(k)
    dv = alloc.empty_like(v)
    dv_token_major = value_strides(dv, head_layout, hkv)[2] > MAX_SPLIT_OFFSET  # non-dense halves v: contiguous dv
    if dv_token_major:
        dv = alloc.empty(B, N, 2 * hkv, d, dtype=v.dtype, device=v.device).transpose(1, 2)  # split Hkv·d instead
    v_split = value_split(v, head_layout, hkv) or value_split(dv, head_layout, hkv)
    problem = Problem(d, q.element_size(), causal, N, device_sm(q.device), hkv < H, head_layout == "v2", v_split)
    form = bwd_form(problem)
    kwargs = dict(HEAD_DIM=d, V_WIDTH=width, SHARED_K=head_layout == "v2", V_SPLIT=v_split, CAUSAL=causal,
                  DOT_PRECISION=dot_precision(q.dtype), ARCH=problem.sm)
    q_s, dq_s = pair_strides(q, head_layout, H), pair_strides(dq, head_layout, H)
    k_s, dk_s = pair_strides(k, head_layout, hkv, key=True), pair_strides(dk, head_layout, hkv, key=True)
    v_s, dv_s = value_strides(v, head_layout, hkv), value_strides(dv, head_layout, hkv)
    kwargs_kv = dict(kwargs, GQA=hkv < H)  # the dK/dV programs' group loop (bwd_steps._dkdv_program)
    tail = (scale * LOG2E, scale, do_scale)
    # dQ programs are per diff-head; dK/dV (and the one-launch forms) per key/value group.
    scalars = (H, H // hkv, N, seqlen_bucket(N), grid_bucket(B, H, N)) + tail
    scalars_kv = (H, H // hkv, N, seqlen_bucket(N), grid_bucket(B, hkv, N)) + tail
    with device_guard(q.device):
        _bwd_preprocess_kernel[(n_pre * B * H,)](
            dout, o_ref, o2, lam_bhn, norm_weight, do, delta, dw_part, dlam,
            *dout.stride(), *o_ref.stride(), *lam_bhn.stride(), norm_weight.stride(0) if has_norm else 0,
            H, N, norm_eps, out_scale,
            WIDTH=width, HAS_NORM=has_norm, NEED_DW=dw_part is not None, NEED_DLAM=needs_dlam, BLOCK_M=pre_m,
        )
        if form == "separate":
            launch("dkdv", _bwd_dkdv, lambda meta: (cdiv(N, meta["BLOCK_N"]) * B * hkv,), (
                q, k, v, g, lse, delta, lam_bhn, dk, dv,
                *q_s, *k_s, *v_s, *g.stride(), *lam_bhn.stride(), *dk_s, *dv_s, *scalars_kv), kwargs_kv, problem)
            launch("dq", _bwd_dq, lambda meta: (cdiv(N, meta["BLOCK_M"]) * B * H,), (
                q, k, v, g, lse, delta, lam_bhn, dq,
                *q_s, *k_s, *v_s, *g.stride(), *lam_bhn.stride(), *dq_s, *scalars), kwargs, problem)
        else:
            # atomic: dQ accumulates in fp32 (zeroed here; the kernel adds s·dSᵀ·K per key block), then one cast.
            atomic = form == "atomic"
            dq_acc = dq
            if atomic:
                dq_acc = dq.zero_() if q.dtype == torch.float32 else torch.zeros(q.shape, dtype=torch.float32,
                                                                                  device=q.device)
            launch(form, _bwd_atomic if atomic else _bwd_fused, lambda meta: (cdiv(N, meta["BLOCK_N"]) * B * hkv,), (
                q, k, v, g, lse, delta, lam_bhn, dk, dv, dq_acc,
                *q_s, *k_s, *v_s, *g.stride(), *lam_bhn.stride(), *dk_s, *dv_s,
                *pair_strides(dq_acc, head_layout, H), *scalars_kv), dict(kwargs_kv, DQ_ATOMIC=atomic), problem)
            if dq_acc is not dq:
                dq.copy_(dq_acc)
    dw = dw_part.sum(0).to(norm_weight.dtype) if dw_part is not None else None
    if dv_token_major:  # back to empty_like(v)'s strides, which the torch.library op's fake promises (ops.py)
        dv = dv.contiguous()
    return dq, dk, dv, dlam, dw
