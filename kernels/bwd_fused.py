"""The backward's dK/dV and dQ in one launch (the `fused` and `atomic` forms of `configs.bwd_form`; launched by
`bwd.diff_attn_bwd`).

fused (DQ_ATOMIC=False, deterministic): program p of a key/value group first runs the dK/dV program of key block p
(BLOCK_N keys, query steps of BLOCK_M; summed over the group's diff-heads), stores dK and dV, then the dQ program of
query block p (BLOCK_N rows, key steps of BLOCK_M) of each of the group's diff-heads — Triton tutorial 06's order.
Every output element still has exactly one writer, and the executed work is the separate form's (dQ recomputes both
maps and dP); what it saves is a launch and, when causal, the load imbalance: key block p is seen by N − p·BLOCK_N
queries and query block p sees (p + 1)·BLOCK_N keys, so every program does about the same work and no wave ends
with a few heavy programs.

atomic (DQ_ATOMIC=True, opt-in, never in deterministic mode): the dK/dV loop also adds s·dSᵀ·K of each (key block,
query block) pair to an fp32 dQ buffer with `tl.atomic_add` (relaxed), so the maps and dP are computed once: 20 N²d
matrix FLOPs per diff-head instead of 28, 2 exponentials per (query, key) pair instead of 4. The order in which the
key blocks' shares reach a dQ element depends on scheduling, so dQ is not bitwise reproducible (dK, dV, dλ and the
norm weight's gradient still are).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .bwd_steps import _dkdv_program, _dq_program
from .configs import PRUNE, autotune_configs
from .fwd import _block_and_head


@triton.jit
def _bwd_fused_kernel(
    Q, K, V, DO, LSE, DELTA, LAM, DK, DV, DQ,
    stride_qb, stride_qh, stride_qp, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kp, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_dkb, stride_dkh, stride_dkp, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvn, stride_dvd,
    stride_dqb, stride_dqh, stride_dqp, stride_dqn, stride_dqd,
    H, GROUP, N, N_BUCKET, GRID_BUCKET, qk_scale, sm_scale, do_scale,
    HEAD_DIM: tl.constexpr, V_WIDTH: tl.constexpr, SHARED_K: tl.constexpr, V_SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ARCH: tl.constexpr, DQ_ATOMIC: tl.constexpr, GQA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr = False,
):
    """One program per (batch, key/value group, block p): key block p's dK/dV of the group (summed over its GROUP
    diff-heads), then (unless DQ_ATOMIC) query block p's dQ of each of those diff-heads, with the block sizes
    swapped. DQ is the gradient itself (fused) or a zeroed fp32 buffer (atomic)."""
    blk, bg = _block_and_head(N, BLOCK_N, False)
    _dkdv_program(Q, K, V, DO, LSE, DELTA, LAM, DK, DV, DQ,
                  stride_qb, stride_qh, stride_qp, stride_qn, stride_qd, stride_kb, stride_kh, stride_kp, stride_kn,
                  stride_kd, stride_vb, stride_vh, stride_vs, stride_vn, stride_vd, stride_ob, stride_oh, stride_on,
                  stride_od, stride_lb, stride_lh, stride_ln, stride_dkb, stride_dkh, stride_dkp, stride_dkn,
                  stride_dkd, stride_dvb, stride_dvh, stride_dvs, stride_dvn, stride_dvd, stride_dqb, stride_dqh,
                  stride_dqp, stride_dqn, stride_dqd,
                  H, GROUP, N, qk_scale, sm_scale, do_scale, blk, bg,
                  HEAD_DIM, V_WIDTH, SHARED_K, V_SPLIT, CAUSAL, DOT_PRECISION, BLOCK_M, BLOCK_N, SPLIT, DQ_ATOMIC,
                  GQA)
    if not DQ_ATOMIC:
        b = (bg // (H // GROUP)).to(tl.int64)
        first = (bg % (H // GROUP)).to(tl.int64) * GROUP  # the group's first diff-head
        for j in range(GROUP):
            _dq_program(Q, K, V, DO, LSE, DELTA, LAM, DQ,
                        stride_qb, stride_qh, stride_qp, stride_qn, stride_qd, stride_kb, stride_kh, stride_kp,
                        stride_kn, stride_kd, stride_vb, stride_vh, stride_vs, stride_vn, stride_vd, stride_ob,
                        stride_oh, stride_on, stride_od, stride_lb, stride_lh, stride_ln, stride_dqb, stride_dqh,
                        stride_dqp, stride_dqn, stride_dqd,
                        H, GROUP, N, qk_scale, sm_scale, do_scale, blk, b, first + j,
                        HEAD_DIM, V_WIDTH, SHARED_K, V_SPLIT, CAUSAL, DOT_PRECISION, BLOCK_N, BLOCK_M)


# One autotuned object per form, each with its own row list (configs.ROWS["fused"] / ["atomic"]). DQ_ATOMIC is in
# the key all the same (a key must hold every flag that changes the kernel). ARCH, V_WIDTH, SHARED_K, V_SPLIT and why
# GROUP is not in it: see the forward's key (fwd.py); GRID_BUCKET counts this launch's programs (B·Hkv·blocks).
_KEY = ["N_BUCKET", "GRID_BUCKET", "HEAD_DIM", "V_WIDTH", "SHARED_K", "V_SPLIT", "CAUSAL", "ARCH", "DQ_ATOMIC",
        "GQA"]
_bwd_fused = triton.autotune(configs=autotune_configs("fused"), key=_KEY,
                             prune_configs_by={"early_config_prune": PRUNE["fused"]})(_bwd_fused_kernel)
_bwd_atomic = triton.autotune(configs=autotune_configs("atomic"), key=_KEY,
                              prune_configs_by={"early_config_prune": PRUNE["atomic"]})(_bwd_fused_kernel)
