"""Roofline model of the forward kernel (issue 17): one row per forward config autotuning may pick on an H200 (sm_90,
bf16/fp16) for a shape, i.e. the fused two-accumulator rows and the one-accumulator SPLIT rows of
`kernels/configs.py`. Plugged into `benchmarks/roofline.py` (`rows(shape)`), which adds the time at each ceiling.

Counted per diff-head (q/k heads 2h, 2h+1, v head h), summed over B·H, for one inference forward:
- executed matmul FLOPs: every row block runs BLOCK_M rows (padded ones too) against whole key blocks: all
  ceil(N/BLOCK_N) of them, or when causal those up to its last row (the diagonal block in full). Per executed
  (row, key) pair 12·d: two QKᵀ (2·d each) and two P·V of width 2d (4·d each). Both forms execute the same
  products; the SPLIT form only does them in two passes.
- useful FLOPs: `benchmarks.common.flops_fwd` (12·N²·d, halved when causal), what the benchmark's TFLOP/s divides.
- exponentials: one per executed score element per map, plus the running-max correction exp2(m − m_new), one per
  row per key block per map.
- bytes: q once; K1, K2 and V streamed once per row block (a row block re-reads its head's keys: the issue's
  B·H·ceil(N/BLOCK_M)·N·(2d+2d) elements when non-causal, only visited key blocks when causal, masked tail rows not
  read); the output written once. SPLIT adds V a second time (one pass per map) and its fp32 scratch (written
  after pass 1, read back in the epilogue). λ is a per-head scalar in the model (stride 0): not counted. This is
  the traffic into the SMs (L2 or HBM); consecutive programs share a head, so most re-reads hit L2: `bytes_once`
  is each tensor once, the HBM floor if they all do.
- extra keys: `bytes_once`; `train_bytes` (the training forward also writes both LSE rows and O2, and the
  pre-norm difference with the norm epilogue: counted without it); `alu_ops`, fp32 CUDA-core operations the
  softmax needs per executed score element and map (scale-and-subtract FMA, row max, row sum, down-convert: ~4.5)
  plus the accumulator rescale (2d multiplies per row per key block per map, i.e. 2d/BLOCK_N per element);
  `serial_us`, the time if matmul, exponentials and ALU work never overlap — what the compiled kernels do today
  (every wgmma is waited on at once: ../shared/reference/perf-facts-2026-12-01.md), hence the expected time,
  with the roofline's max() as the floor an overlapping (warp-specialised) schedule could approach.
"""

from __future__ import annotations

import math

from kernels import configs

from .common import flops_fwd
from .roofline import CEILINGS

# fp32 CUDA-core issue rate: 132 SMs x 128 lanes x 1.98 GHz (datasheet-derived, a lead: not measured here)
ALU_OPS_PER_S = 132 * 128 * 1.98e9
SOFTMAX_OPS = 4.5  # per executed score element and map, besides the exponential


def _row_blocks(N: int, bm: int, bn: int, causal: bool):
    """(executed key columns, keys actually read) per row block."""
    out = []
    for i in range(math.ceil(N / bm)):
        hi = min((i + 1) * bm, N) if causal else N
        cols = math.ceil(hi / bn) * bn
        out.append((cols, min(cols, N)))
    return out


def variant_name(row) -> str:
    return f"{'split' if row.split else 'fused'} {row.block_m}x{row.block_n} w{row.warps} s{row.stages}"


def model(shape, row) -> dict:
    B, H, N, d, eb = shape.B, shape.H, shape.N, shape.d, shape.dtype_bytes
    bm, bn = row.block_m, row.block_n
    blocks = _row_blocks(N, bm, bn, shape.causal)
    pairs = sum(bm * cols for cols, _ in blocks)  # executed (row, key) pairs per diff-head
    key_blocks = sum(cols // bn for cols, _ in blocks)
    keys_read = sum(read for _, read in blocks)
    heads = B * H
    q_bytes = heads * N * 2 * d * eb
    out_bytes = heads * N * 2 * d * eb
    kv_width = 6 * d if row.split else 4 * d  # K1 + K2 + V (2d), or K_i + V per pass, two passes
    stream = heads * keys_read * kv_width * eb
    scratch = 2 * heads * N * 2 * d * 4 if row.split else 0
    once = q_bytes + heads * N * 4 * d * eb + out_bytes + scratch
    return dict(
        kernel="fwd", variant=variant_name(row),
        useful_flops=flops_fwd(B, H, N, d, shape.causal),
        executed_flops=heads * pairs * 12.0 * d,
        exp=heads * 2.0 * (pairs + bm * key_blocks),
        bytes=float(q_bytes + stream + out_bytes + scratch),
        bytes_once=float(once),
        train_bytes=float(heads * N * (2 * 4 + 2 * d * eb)),
        alu_ops=heads * 2.0 * pairs * (SOFTMAX_OPS + 2 * d / bn),
        note=("one accumulator: map 2 then map 1, V streamed twice, fp32 scratch" if row.split
              else "two accumulators, one pass"),
    )


def rows(shape) -> list:
    """One row per forward config the autotuner may pick on an H200 for this shape."""
    p = configs.Problem(shape.d, shape.dtype_bytes, shape.causal, shape.N, 90)
    out = []
    for row in configs.fitting_rows("fwd", p):
        r = model(shape, row)
        t = {"matmul": r["executed_flops"] / CEILINGS["matmul_flops"], "exp": r["exp"] / CEILINGS["exp"],
             "alu": r["alu_ops"] / ALU_OPS_PER_S}
        r["serial_us"] = sum(t.values()) * 1e6
        r["alu_us"] = t["alu"] * 1e6
        r["once_us"] = r["bytes_once"] / CEILINGS["copy_bytes"] * 1e6
        out.append(r)
    return out
