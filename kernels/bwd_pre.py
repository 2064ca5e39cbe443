"""The backward's first launch: the RMS-norm epilogue's backward, both Δs and λ's per-row gradient (see the formulas
in `bwd.py`). Kept apart from the dK/dV and dQ kernels only to keep each file short.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import _block_and_head


@triton.jit
def _bwd_preprocess_kernel(
    DOUT, OREF, O2, LAM, NORM_W, DO, DELTA, DW_PART, DLAM,
    stride_db, stride_dh, stride_dn, stride_dd,
    stride_rb, stride_rh, stride_rn, stride_rd,
    stride_lb, stride_lh, stride_ln,
    stride_w,
    H, N, norm_eps, out_scale,
    WIDTH: tl.constexpr, HAS_NORM: tl.constexpr, NEED_DW: tl.constexpr, NEED_DLAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Epilogue backward, both Δs, the per-row ∂L/∂λ = −rowsum(dO ⊙ O2), and the norm weight's per-block partial
    gradient.

    OREF is the pre-norm difference o when HAS_NORM, else the output itself (= out_scale·o). Without the norm the
    main kernels read DOUT directly and apply out_scale themselves, so nothing (B, H, N, WIDTH) is written here.
    WIDTH: the output rows' width (2d; d for the v2 head layout).
    """
    pid_m, bh = _block_and_head(N, BLOCK_M, False)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, WIDTH)
    row_ok = pid_m * BLOCK_M + rows < N
    m2 = row_ok[:, None]

    dy = tl.load(DOUT + b * stride_db + h * stride_dh + row0 * stride_dn
                 + (rows[:, None] * stride_dn + offs_dv[None, :] * stride_dd), mask=m2, other=0.0).to(tl.float32)
    o = tl.load(OREF + b * stride_rb + h * stride_rh + row0 * stride_rn
                + (rows[:, None] * stride_rn + offs_dv[None, :] * stride_rd), mask=m2, other=0.0).to(tl.float32)
    sav_base = ((b * H + h) * N + row0) * WIDTH  # the saved (B, H, N, WIDTH) buffers are contiguous
    sav_tile = rows[:, None] * WIDTH + offs_dv[None, :]
    o2 = tl.load(O2 + sav_base + sav_tile, mask=m2, other=0.0).to(tl.float32)
    lam = tl.load(LAM + b * stride_lb + h * stride_lh + row0 * stride_ln + rows * stride_ln, mask=row_ok,
                  other=0.0).to(tl.float32)

    if HAS_NORM:
        # y = o·rstd·w·c  =>  dO = rstd·(g − o·rstd²·mean(g ⊙ o)),  g = dy·w·c;   dw = Σ_rows dy ⊙ o·rstd·c
        rstd = tl.math.rsqrt(tl.sum(o * o, 1) / WIDTH + norm_eps)
        w = tl.load(NORM_W + offs_dv * stride_w).to(tl.float32)
        if NEED_DW:
            part = tl.sum(dy * o * rstd[:, None], 0) * out_scale
            tl.store(DW_PART + tl.program_id(0).to(tl.int64) * WIDTH + offs_dv, part)
        g = dy * (w * out_scale)[None, :]
        dot_go = tl.sum(g * o, 1) / WIDTH
        do = rstd[:, None] * (g - o * (rstd * rstd * dot_go)[:, None])
        if NEED_DLAM:  # λ's gradient from the unrounded dO: it is an output of its own, not part of dS
            tl.store(DLAM + (b * H + h) * N + row0 + rows, -tl.sum(do * o2, 1), mask=row_ok)
        do = do.to(DO.dtype.element_ty)
        tl.store(DO + sav_base + sav_tile, do, mask=m2)
        # The Δs from the rounded dO that the main kernels' dP = dO·Vᵀ uses, so that dP − Δ is consistent.
        do = do.to(tl.float32)
        delta_o = tl.sum(do * o, 1)
        delta2 = tl.sum(do * o2, 1)
    else:
        # dO = out_scale·dy and OREF = out_scale·o: rowsum(dO ⊙ o) = rowsum(dy ⊙ OREF), no division by out_scale.
        delta_o = tl.sum(dy * o, 1)
        delta2 = tl.sum(dy * o2, 1) * out_scale
        if NEED_DLAM:
            tl.store(DLAM + (b * H + h) * N + row0 + rows, -delta2, mask=row_ok)
    delta1 = delta_o + lam * delta2
    d_base = DELTA + (b * 2 * H + 2 * h) * N + row0
    tl.store(d_base + rows, delta1, mask=row_ok)
    tl.store(d_base + N + rows, delta2, mask=row_ok)
