"""Autotune lists for the differential-attention kernels and the filters that prune them.

The lists are small on purpose: every entry is compiled ahead of time for sm_80 and sm_90 by the compile test
(tests/kernels/test_compile.py), which checks shared memory and that ptxas reports no spills. Under Triton's
interpreter a single config is used (autotuning there would only measure numpy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .runtime import interpreter_enabled

_SMALL_D = (16, 32, 64)
_ALL_D = (16, 32, 64, 128)


@dataclass(frozen=True)
class Row:
    """One autotune candidate and the problems it is for."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    head_dims: tuple = _SMALL_D
    min_sm: int = 80  # lowest compute capability (x10) it compiles cleanly for
    fp32: bool = False  # fp32 inputs (ieee dots, twice the operand registers) get their own small rows only

    def config(self) -> triton.Config:
        cfg = triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.warps,
                            num_stages=self.stages)
        cfg.row = self  # travels with the Config for the prune filter (not a kernel argument)
        return cfg


# One forward program holds two fp32 accumulators of BLOCK_M x 2d, i.e. the registers of a plain flash-attention
# program with a 4d-wide output; d=128 therefore only gets 32/64-row blocks. Every row compiles for sm_80 and
# sm_90 without spills (checked by tests/kernels/test_compile.py; `python -m kernels.compile_check` prints them).
_FWD = [
    Row(128, 32, 8, 2, min_sm=90),  # spills 24 B on sm_80 with Triton 3.6's ptxas: Hopper and newer only
    Row(64, 64, 8, 2),
    Row(64, 64, 8, 3),
    Row(64, 32, 8, 3),
    Row(32, 64, 4, 2),
    Row(32, 64, 8, 2, (128,)),
    Row(32, 32, 8, 3, (128,)),
    Row(32, 32, 8, 2, (128,)),
    Row(16, 16, 4, 1, _ALL_D, fp32=True),
]
# Backward: the dK/dV program keeps dK1, dK2 (BLOCK_N x d) and dV (BLOCK_N x 2d) in fp32 while it streams query
# blocks; the dQ program keeps dQ1, dQ2 (BLOCK_M x d). Rows chosen from a ptxas sweep (no spills on sm_80/sm_90).
_BWD_DKDV = [
    Row(64, 32, 8, 2),
    Row(32, 32, 4, 2),
    Row(64, 16, 4, 2),
    Row(32, 32, 8, 2, (128,)),
    Row(16, 16, 8, 1, _ALL_D, fp32=True),
]
_BWD_DQ = [
    Row(64, 64, 8, 2, min_sm=90),  # spills 8-44 B on sm_80 since the dQ loop was split (masked / unmasked)
    Row(64, 32, 4, 2),
    Row(32, 64, 4, 2),
    Row(64, 32, 8, 2, (128,)),
    Row(32, 64, 8, 2, (128,)),
    Row(16, 16, 4, 1, _ALL_D, fp32=True),
]

INTERPRET_FWD = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)
INTERPRET_BWD = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)


def _cfgs(rows):
    return [r.config() for r in rows]


def fwd_configs():
    return [INTERPRET_FWD] if interpreter_enabled() else _cfgs(_FWD)


def bwd_dkdv_configs():
    return [INTERPRET_BWD] if interpreter_enabled() else _cfgs(_BWD_DKDV)


def bwd_dq_configs():
    return [INTERPRET_BWD] if interpreter_enabled() else _cfgs(_BWD_DQ)


def config_fits(cfg: triton.Config, head_dim: int, dtype_bytes: int, causal: bool, seqlen: int, sm: int) -> bool:
    """Whether a config is legal and worth trying for this problem on architecture sm (e.g. 90)."""
    row = getattr(cfg, "row", None)
    if row is None:  # the interpreter's single config
        return True
    if head_dim not in row.head_dims or sm < row.min_sm or row.fp32 != (dtype_bytes == 4):
        return False
    if causal and row.block_m % row.block_n != 0:  # the forward's causal split must be BLOCK_N-aligned
        return False
    return not (row.block_m > 64 and seqlen <= 64)  # short sequences: a 128-row block would be mostly masked


def _device_sm(t) -> int:
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90  # the interpreter: configs are not pruned by architecture there


def autotune_enabled() -> bool:
    """DIFF_ATTN_AUTOTUNE=0 uses the first fitting config of each list instead of timing them all (test suites on a
    GPU, where autotuning every variant would dominate the run)."""
    return os.environ.get("DIFF_ATTN_AUTOTUNE", "1").strip() != "0"


def _prune(fits):
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        args = {**named_args, **kwargs}
        kept = [
            c for c in configs
            if fits(c, args["HEAD_DIM"], q.element_size(), bool(args["CAUSAL"]), int(args["N"]), _device_sm(q))
        ]
        if not kept:  # every (head dim, dtype, arch) has rows; reaching this is a bug in the lists
            raise RuntimeError(f"no kernel config fits HEAD_DIM={args['HEAD_DIM']} dtype={q.dtype} "
                               f"causal={args['CAUSAL']} N={args['N']}")
        return kept if autotune_enabled() else kept[:1]

    return prune


prune_fwd = _prune(config_fits)
# The backward's loops need no BLOCK_M/BLOCK_N alignment for causal masking.
prune_bwd = _prune(lambda cfg, d, nbytes, causal, n, sm: config_fits(cfg, d, nbytes, False, n, sm))


def default_fwd_rows(head_dim: int, dtype_bytes: int, causal: bool, sm: int, seqlen: int = 4096):
    """The (BLOCK_M, BLOCK_N, warps, stages) rows autotuning may pick for this problem on a GPU."""
    return [c for c in _cfgs(_FWD) if config_fits(c, head_dim, dtype_bytes, causal, seqlen, sm)]


def default_bwd_rows(kernel: str, head_dim: int, dtype_bytes: int, causal: bool, sm: int, seqlen: int = 4096):
    """Same for the backward's "dkdv" or "dq" kernel."""
    rows = _BWD_DKDV if kernel == "dkdv" else _BWD_DQ
    return [c for c in _cfgs(rows) if config_fits(c, head_dim, dtype_bytes, False, seqlen, sm)]


def pre_block_m(head_dim: int) -> int:
    """Rows per backward-preprocess program: the (rows x 2d) fp32 tiles it holds (dO, o, O2, g) stay at 4096
    elements, i.e. 32 registers each for 4 warps, so d = 128 does not spill."""
    return 4096 // (2 * head_dim)
