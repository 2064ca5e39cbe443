"""Launch configs of the language-model kernels (varlen forward/backward, decode).

Fixed rows for now, one per (kernel, head-dim class, dtype class, architecture), chosen from the dense kernels'
spill-free shapes (kernels/configs.py) and checked by `python -m kernels.compile_check_lm` (no spills, shared
memory within the limit, sm_80 and sm_90). They are not autotuned and not yet timed on a GPU: a device sweep may
replace them (and may add autotune lists here, kept apart from the dense kernels' ROWS).
Under Triton's interpreter one small config per kernel is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from .runtime import interpreter_enabled

_SMALL, _D64, _D128 = (16, 32), (64,), (128,)


@dataclass(frozen=True)
class LmRow:
    block_m: int
    block_n: int
    warps: int
    stages: int
    head_dims: tuple
    fp32: bool = False
    min_sm: int = 80
    max_sm: int = 1000

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.warps,
                             num_stages=self.stages)


# First fitting row wins. Rows mirror the dense lists' spill-free shapes; the varlen programs carry a few more
# per-row registers (sequence bounds, the bottom-right causal limit).
LM_ROWS = {
    "varlen_fwd": [
        LmRow(64, 64, 8, 2, _D64 + _SMALL),
        LmRow(32, 64, 8, 2, _D128),
        LmRow(16, 16, 2, 1, _SMALL, fp32=True),  # 4 warps spill 8-12 B at d = 32 on sm_90 with Triton 3.6
        LmRow(16, 16, 4, 1, _D64 + _D128, fp32=True),
    ],
    "varlen_dkdv": [
        LmRow(64, 32, 8, 2, _D64),
        LmRow(32, 32, 4, 1, _SMALL),  # 32x64x4w (Triton 3.8) and 32x32x4w two stages (3.6) spill 8-76 B
        LmRow(32, 32, 8, 2, _D128),
        LmRow(16, 16, 4, 1, _SMALL + _D64 + _D128, fp32=True),  # 8 warps spill 20-32 B on sm_90
    ],
    "varlen_dq": [
        LmRow(64, 32, 4, 2, _D64 + _SMALL),
        LmRow(64, 32, 8, 2, _D128),
        LmRow(16, 16, 4, 2, _SMALL + _D64 + _D128, fp32=True),  # one stage spills 16-28 B causal at d = 16 on sm_80
    ],
    # Decode: BLOCK_M (query rows of one KV group: G·Nq rounded up to a power of two, at least 16) is chosen per
    # call by `decode_block_m`; these rows give BLOCK_N (keys per step) and the fewest warps.
    # BLOCK_M here is the cap; warps follow BLOCK_M·d (`decode_warps`, at least the row's): two fp32 (BLOCK_M, 2d)
    # accumulators.
    "decode": [
        LmRow(64, 64, 4, 3, _D64),
        LmRow(64, 64, 4, 2, _SMALL),  # three stages spill 8-16 B at d = 16 on sm_80 with Triton 3.6
        LmRow(32, 32, 4, 2, _D128),  # 64 rows at d = 128 spill even with 8 warps
        # fp32 (ieee dots): 32-64 rows spill; 4 warps spill on 3.6. d = 16: 16x16x2w spills 16 B on sm_90 with
        # Triton 3.8 since the masked key blocks are bounded by the chunk's end (cache_leftpad); 16x32 does not.
        LmRow(16, 32, 2, 1, (16,), fp32=True),
        LmRow(16, 16, 2, 1, (32,), fp32=True),
        LmRow(16, 16, 4, 1, _D64 + _D128, fp32=True),
    ],
}
LM_KERNELS = tuple(LM_ROWS)

INTERPRET = {
    "varlen_fwd": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    "varlen_dkdv": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    "varlen_dq": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    "decode": triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=1),
}
COMBINE_ROWS = 16  # rows per program of the decode combine kernel


def lm_rows(kernel: str, head_dim: int, dtype_bytes: int, sm: int) -> list:
    return [r for r in LM_ROWS[kernel] if head_dim in r.head_dims and r.fp32 == (dtype_bytes == 4)
            and r.min_sm <= sm <= r.max_sm]


def lm_config(kernel: str, head_dim: int, dtype_bytes: int, sm: int) -> triton.Config:
    """The config a launch uses (the interpreter's under TRITON_INTERPRET=1)."""
    if interpreter_enabled():
        return INTERPRET[kernel]
    rows = lm_rows(kernel, head_dim, dtype_bytes, sm)
    if not rows:  # every (head dim, dtype, arch) has a row; reaching this is a bug in the lists
        raise RuntimeError(f"no {kernel} config for d={head_dim}, {dtype_bytes}-byte inputs, sm_{sm}")
    return rows[0].config()


def decode_block_m(group_rows: int, cap: int) -> int:
    """Query rows per decode program: G·Nq rounded up to a power of two, at least 16 (the smallest tl.dot M),
    at most `cap` (the config's BLOCK_M); more rows take more programs."""
    return min(cap, max(16, 1 << max(0, group_rows - 1).bit_length()))


def decode_warps(block_m: int, head_dim: int, least: int) -> int:
    """Warps for a decode program: its two fp32 (BLOCK_M, 2d) accumulators at about 64 registers a thread
    (BLOCK_M·d / 512 warps), at most 8 and at least the row's own warps (`least`)."""
    return max(least, min(8, block_m * head_dim // 512))


def combine_warps(head_dim: int) -> int:
    """The combine holds two (16, 2d) fp32 sums and two loaded partials: 4 warps spill at d = 128 (fp32 output)."""
    return 4 if head_dim <= 64 else 8
