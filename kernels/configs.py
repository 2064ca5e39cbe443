"""Autotune lists for the differential-attention kernels and the filters that prune them.

The lists are small on purpose: every entry is compiled ahead of time for sm_80 and sm_90 by the compile test
(tests/kernels/test_compile.py), which checks shared memory and that ptxas reports no spills. Under Triton's
interpreter a single config is used (autotuning there would only measure numpy).
"""

from __future__ import annotations

import os

import torch
import triton

from .runtime import interpreter_enabled

# (BLOCK_M, BLOCK_N, num_warps, num_stages, head dims it is for[, lowest sm it is for]).
# One forward program holds two fp32 accumulators of BLOCK_M x 2d, i.e. the registers of a plain flash-attention
# program with a 4d-wide output; d=128 therefore only gets 32/64-row blocks. Every row here compiles for sm_80 and
# sm_90 without spills (checked by tests/kernels/test_compile.py; `python -m kernels.compile_check` prints them).
_SMALL_D = (16, 32, 64)
_FWD = [
    (128, 32, 8, 2, _SMALL_D, 90),  # spills 24 B on sm_80 with Triton 3.6's ptxas: Hopper and newer only
    (64, 64, 8, 2, _SMALL_D),
    (64, 64, 8, 3, _SMALL_D),
    (64, 32, 8, 3, _SMALL_D),
    (32, 64, 4, 2, _SMALL_D),
    (32, 64, 8, 2, (128,)),
    (32, 32, 8, 3, (128,)),
    (32, 32, 8, 2, (128,)),
]
# Backward: the dK/dV program keeps dK1, dK2 (BLOCK_N x d) and dV (BLOCK_N x 2d) in fp32 while it streams query
# blocks; the dQ program keeps dQ1, dQ2 (BLOCK_M x d). Rows chosen from a ptxas sweep (no spills on sm_80/sm_90).
_BWD_DKDV = [
    (64, 32, 8, 2, _SMALL_D),
    (32, 32, 4, 2, _SMALL_D),
    (64, 16, 4, 2, _SMALL_D),
    (32, 32, 8, 2, (128,)),
]
_BWD_DQ = [
    (64, 64, 8, 2, _SMALL_D),
    (64, 32, 4, 2, _SMALL_D),
    (32, 64, 4, 2, _SMALL_D),
    (64, 32, 8, 2, (128,)),
    (32, 64, 8, 2, (128,)),
]

INTERPRET_FWD = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)
INTERPRET_BWD = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)


def _cfgs(rows):
    # The head dims and lowest architecture a row is for travel in the Config as plain attributes (not kernel
    # arguments).
    out = []
    for m, n, w, s, dims, *min_sm in rows:
        cfg = triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        cfg.head_dims = dims
        cfg.min_sm = min_sm[0] if min_sm else 0
        out.append(cfg)
    return out


def fwd_configs():
    return [INTERPRET_FWD] if interpreter_enabled() else _cfgs(_FWD)


def bwd_dkdv_configs():
    return [INTERPRET_BWD] if interpreter_enabled() else _cfgs(_BWD_DKDV)


def bwd_dq_configs():
    return [INTERPRET_BWD] if interpreter_enabled() else _cfgs(_BWD_DQ)


def _fits(cfg: triton.Config, head_dim: int, dtype_bytes: int, causal: bool, seqlen: int, sm: int,
          fp32_tile: int) -> bool:
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if head_dim not in getattr(cfg, "head_dims", (head_dim,)) or sm < getattr(cfg, "min_sm", 0):
        return False
    if causal and bm % bn != 0:  # the causal split point is a multiple of BLOCK_M that must be BLOCK_N-aligned
        return False
    if dtype_bytes == 4 and bm * bn > fp32_tile:  # fp32 operands (ieee dots) take twice the registers
        return False
    return not (bm > 64 and seqlen <= 64)  # short sequences: a 128-row block would be mostly masked


def fwd_config_fits(cfg, head_dim, dtype_bytes, causal, seqlen, sm):
    """Whether a forward config is legal and worth trying for this problem on architecture sm (e.g. 90)."""
    return _fits(cfg, head_dim, dtype_bytes, causal, seqlen, sm, fp32_tile=64 * 32)


def bwd_config_fits(cfg, head_dim, dtype_bytes, causal, seqlen, sm):
    return _fits(cfg, head_dim, dtype_bytes, False, seqlen, sm, fp32_tile=32 * 32)


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
        # Never return an empty list: the smallest config is legal for every problem.
        kept = kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return kept if autotune_enabled() else kept[:1]

    return prune


prune_fwd = _prune(fwd_config_fits)
prune_bwd = _prune(bwd_config_fits)


def default_fwd_rows(head_dim: int, dtype_bytes: int, causal: bool, sm: int, seqlen: int = 4096):
    """The (BLOCK_M, BLOCK_N, warps, stages) rows autotuning may pick for this problem on a GPU."""
    return [c for c in _cfgs(_FWD) if fwd_config_fits(c, head_dim, dtype_bytes, causal, seqlen, sm)]


def default_bwd_rows(kernel: str, head_dim: int, dtype_bytes: int, causal: bool, sm: int, seqlen: int = 4096):
    """Same for the backward's "dkdv" or "dq" kernel."""
    rows = _BWD_DKDV if kernel == "dkdv" else _BWD_DQ
    return [c for c in _cfgs(rows) if bwd_config_fits(c, head_dim, dtype_bytes, causal, seqlen, sm)]


def pre_block_m(head_dim: int) -> int:
    """Rows per backward-preprocess program: the (rows x 2d) fp32 tiles it holds (dO, o, O2, g) stay at 4096
    elements, i.e. 32 registers each for 4 warps, so d = 128 does not spill."""
    return 4096 // (2 * head_dim)
