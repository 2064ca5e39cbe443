"""The autotune candidates of every kernel (the rows), the problems they fit, and the side table that maps a
`triton.Config` back to its row. Policy — which row a launch uses — is in kernels/configs.py.

The lists are small on purpose: every entry is compiled ahead of time for sm_80 and sm_90 by the compile tests
(tests/kernels/test_compile.py, test_compile_bwd.py), which check shared memory and that ptxas reports no spills.

Row metadata (head dims, minimum architecture, dtype class, sequence range) lives in a side table keyed by the block
shape, not on the `triton.Config` objects: Triton's on-disk autotune cache (TRITON_CACHE_AUTOTUNING=1) serialises
`config.__dict__` to JSON and rebuilds `Config(**d)`, so a Config must carry nothing but its own fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import triton

from .runtime import interpreter_enabled

_ALL_D = (16, 32, 64, 128)
_D64 = (64,)
_D128 = (128,)
_SMALL = (16, 32)


@dataclass(frozen=True)
class Row:
    """One autotune candidate and the problems it is for."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    head_dims: tuple = _D64
    min_sm: int = 80  # lowest compute capability (x10) it compiles cleanly for
    max_sm: int = 1000  # highest (rows that spill on Hopper but not on Ampere)
    fp32: bool = False  # fp32 inputs (ieee dots, twice the operand registers) get their own small rows only
    # The kernel's SPLIT flag, None where the kernel has none. dK/dV: dK and dV in two passes. Forward: the
    # one-accumulator form (map 2 then map 1, one fp32 accumulator live at a time; kernels/fwd.py).
    split: bool | None = None
    min_seqlen: int = 0  # sequence lengths the row is a candidate for (rows for long sequences only, and rows
    max_seqlen: int = 1 << 62  # retired there, keeping each problem at <= 5 candidates)
    causal: bool | None = None  # None: both; False: non-causal problems only (a row that spills when causal)

    @property
    def key(self) -> tuple:
        return (self.block_m, self.block_n, self.warps, self.stages, self.split)

    def config(self) -> triton.Config:
        kwargs = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        if self.split is not None:
            kwargs["SPLIT"] = self.split
        return triton.Config(kwargs, num_warps=self.warps, num_stages=self.stages)


def _dkdv(*args, split: bool = False, **kwargs) -> Row:
    return Row(*args, split=split, **kwargs)


def config_key(cfg: triton.Config) -> tuple:
    """The side table's key of a Config (also of one rebuilt from Triton's JSON autotune cache)."""
    return (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages, cfg.kwargs.get("SPLIT"))


# Rows of the one-launch backward forms (kernels/bwd_fused.py; see `bwd_form`): BLOCK_N keys per program with
# BLOCK_M-query steps for dK/dV, then (fused) BLOCK_N query rows with BLOCK_M-key steps for dQ. From a ptxas sweep with
# Triton 3.6 and 3.8 (NOTES 2026-12-01): the fused causal kernel has four loop bodies (dK/dV diagonal and rest, dQ
# rest and diagonal) and spills with every wgmma row at d=64, so its wgmma rows are non-causal only (`_FULL_ONLY`).
FUSED_ROWS = [
    _dkdv(32, 64, 8, 2, _D64, min_sm=90),  # wgmma (dK/dV n64/n128 products, QKᵀ/dP n32/n16)
    _dkdv(16, 128, 8, 2, _D64, min_sm=90),  # wgmma, 128 keys per program
    _dkdv(64, 32, 8, 2, _D64),  # mma.sync; clean causal too
    _dkdv(16, 32, 4, 2, _D64 + _SMALL),  # mma.sync, 2+ programs per SM; clean everywhere
    _dkdv(16, 64, 8, 2, _D128, min_sm=90, split=True),
    _dkdv(32, 32, 8, 2, _D128),  # spills 108-124 B causal (3.6, sm_80 and sm_90)
    _dkdv(16, 32, 8, 2, _D128),  # the causal d=128 row of sm_80
    # No fp32 rows: 16x16 spills 8-840 B in one variant or another (ieee dots hold twice the operand registers);
    # fp32 inputs run the separate form (`bwd_form`).
]
# The atomic form has no dQ phase (two loop bodies): its wide rows compile clean causal too.
ATOMIC_ROWS = [
    _dkdv(16, 128, 8, 2, _D64, min_sm=90),  # wgmma; half the atomic adds of 64-key blocks
    _dkdv(16, 64, 4, 3, _D64, min_sm=90),  # wgmma, 2 programs per SM (80 KB shared)
    _dkdv(32, 64, 8, 2, _D64, min_sm=90),  # wgmma; spills causal (4-36 B)
    _dkdv(32, 32, 4, 2, _D64, min_sm=90),  # mma.sync, the separate form's measured winner; sm_80 causal spills 40 B
    _dkdv(16, 32, 4, 2, _D64 + _SMALL),  # clean everywhere (3.6, 3.8, sm_80, sm_90)
    _dkdv(16, 64, 8, 2, _D128, min_sm=90, split=True),
    _dkdv(16, 32, 8, 2, _D128),  # 32x32x8w spills 4-16 B (3.8: sm_80 full, sm_90 causal)
    # No fp32 rows (see FUSED_ROWS).
]
# Head-layout variants (Problem.gqa / v2 / split; compile_check.VARIANTS compiles them as fwd_gqa, dkdv_v2, ...).
# _VARIANT_SPILLS: (kernel, row key) -> ((flags, highest compute capability x10), ...): rows not listed for the
# problems with all of those flags ("gqa+v2": both) on those architectures, because ptxas (Triton 3.6 or 3.8) spills
# them there. _VARIANT_ROWS: (kernel, row key) -> (flags, Row fields): rows listed more widely for such problems,
# as the clean replacements. From the 2026-12-01 variant sweep (bf16/fp32, d = 64/128; NOTES in each entry).
_VARIANT_SPILLS: dict = {
    # dK/dV with GQA (the group loop; its causal queries run in one masked loop, which already removed 150-280 B)
    ("dkdv", (16, 64, 4, 3, False)): (("gqa", 1000),),  # 4-56 B non-causal, sm_80 and sm_90, 3.6 and 3.8
    ("dkdv", (16, 128, 8, 2, False)): (("gqa", 89),),  # 8-28 B causal on sm_80
    ("dkdv", (64, 16, 4, 2, False)): (("gqa", 1000),),  # 4-8 B (3.8: with v2, non-causal; 3.6: causal on sm_90)
    ("dkdv", (32, 64, 8, 2, False)): (("gqa", 1000),),  # 8-68 B on sm_90 with Triton 3.6
    ("dkdv", (16, 64, 8, 2, True)): (("gqa+v2", 1000),),  # d=128: 64 B causal with Triton 3.6
    ("dkdv", (16, 16, 4, 2, False)): (("gqa", 89),),  # fp32 on sm_80: 8-40 B; replaced by 16x16x8x1 (_VARIANT_ROWS)
    ("fused", (32, 64, 8, 2, False)): (("gqa", 1000),),  # 4 B non-causal (3.8)
    ("fused", (16, 64, 8, 2, True)): (("gqa", 1000),),  # d=128: 16-100 B
    ("fused", (32, 32, 8, 2, False)): (("gqa", 1000),),  # d=128: 16-32 B non-causal with Triton 3.6
    # d=128 causal, halves with GQA on sm_80: 12 B with 3.6, and no other fused row fits that class: the backward
    # runs the separate form there (configs.bwd_form falls back where a form has no row)
    ("fused", (16, 32, 8, 2, False)): (("gqa+split", 89),),
    ("atomic", (16, 64, 4, 3, False)): (("gqa", 1000),),  # 60-84 B
    ("atomic", (32, 64, 8, 2, False)): (("gqa", 1000),),  # 72 B non-causal with Triton 3.6
    ("atomic", (32, 32, 4, 2, False)): (("split", 1000),),  # halves: 4 B causal on sm_90 (3.8)
    # forward with the v2 layout's d-wide value: the 64x64 8-warp rows spill 4-16 B on sm_80
    ("fwd", (64, 64, 8, 2, None)): (("v2", 89),),
    ("fwd", (64, 64, 8, 3, None)): (("v2", 89),),
}
_VARIANT_ROWS: dict = {
    ("dkdv", (16, 16, 8, 1, False)): ("gqa", dict(min_sm=80)),  # fp32 GQA on sm_80, where 16x16x4x2 spills
    ("fwd", (64, 32, 8, 3, None)): ("v2", dict(max_seqlen=1 << 62)),  # v2 on sm_80 at N >= LONG, where 64x64 spill
}
# (kernel, row key) that are listed for non-causal problems only (they spill causal).
_FULL_ONLY = {("fused", (32, 64, 8, 2, False)), ("fused", (16, 128, 8, 2, False)), ("fused", (32, 32, 8, 2, False)),
              ("atomic", (32, 64, 8, 2, False)),
              ("dkdv", (16, 64, 4, 3, False))}  # 4 B spills causal on sm_90 with Triton 3.8

# One forward program holds two fp32 accumulators of BLOCK_M x 2d (one per map), i.e. the registers of a plain
# flash-attention program with a 4d-wide output; d=128 therefore only gets 32/64-row blocks. Every row compiles for
# sm_80 and sm_90 without spills (checked by tests/kernels/test_compile.py; `python -m kernels.compile_check` prints
# them). The fixed config of deterministic mode and DIFF_ATTN_AUTOTUNE=0 is the measured winner where one exists
# (MEASURED_WINNERS below), else the first fitting row of the list.
# Long sequences (N >= LONG, issue 17): 128-row blocks with 64/128-key blocks, through the wider fused row or the
# one-accumulator SPLIT form (kernels/fwd.py), which halves the accumulator registers. Rows whose small blocks
# re-read K/V per 32 rows or take narrow key blocks are retired there, so that no problem times more than 5 rows
# (benchmarks/roofline_fwd.py has the reasoning; benchmarks/NOTES.md 2026-12-01 the predictions). Hopper-only:
# every long row is wgmma and ptxas-clean on sm_90 with Triton 3.6 and 3.8.
LONG = 1024
_SHORT = LONG - 1
ROWS = {
    "fwd": [
        Row(128, 32, 8, 2, _D64, min_sm=90),  # spills 24 B on sm_80 with Triton 3.6's ptxas: Hopper and newer only
        Row(64, 64, 8, 2, _D64 + _SMALL, max_seqlen=_SHORT),
        Row(64, 64, 8, 3, _D64 + _SMALL),
        Row(64, 32, 8, 3, _D64, max_seqlen=_SHORT),
        Row(32, 64, 4, 2, _D64 + _SMALL, max_seqlen=_SHORT),
        Row(64, 32, 4, 2, _SMALL),
        # d=64, long: 128x64 fused spills 32 B causal with Triton 3.8 (255 registers), so non-causal only; SPLIT
        # 128x64 is clean both ways (231-254), SPLIT 128x128 (m64n128 throughout) spills 64-100 B causal.
        Row(128, 64, 8, 2, _D64, min_sm=90, min_seqlen=LONG, causal=False),
        Row(128, 64, 8, 2, _D64, min_sm=90, min_seqlen=LONG, split=True),
        Row(128, 128, 8, 2, _D64, min_sm=90, min_seqlen=LONG, split=True, causal=False),
        Row(64, 16, 8, 2, _D128, min_sm=90),  # d=128 with wgmma (BLOCK_M >= 64); 64x32 spills 16-20 B causal
        Row(32, 64, 8, 2, _D128),
        Row(32, 32, 8, 3, _D128),
        Row(32, 32, 8, 2, _D128, max_seqlen=_SHORT),
        # d=128, long: SPLIT 64x64 (the fused form only fits 64x16); s2 spills 20-28 B causal, s1 is clean both ways.
        # 128-row SPLIT blocks spill 470-1500 B at d=128 (the 128x256 accumulator plus the hoisted V tile offsets).
        Row(64, 64, 8, 2, _D128, min_sm=90, min_seqlen=LONG, split=True, causal=False),
        Row(64, 64, 8, 1, _D128, min_sm=90, min_seqlen=LONG, split=True),
        Row(16, 16, 4, 1, _ALL_D, fp32=True),
    ],
    # Backward: the dK/dV program keeps dK1, dK2 (BLOCK_N x d) and dV (BLOCK_N x 2d) in fp32 while it streams
    # query blocks; the dQ program keeps dQ1, dQ2 (BLOCK_M x d). Rows chosen from a ptxas sweep (no spills on
    # sm_80/sm_90).
    "dkdv": [
        _dkdv(32, 64, 8, 2, _D64, min_sm=90),  # 64 keys per program: wgmma on sm_90; spills 32-128 B on sm_80
        _dkdv(32, 32, 4, 2, _D64),  # spills 24 B at d=32 on sm_90 with Triton 3.6
        _dkdv(64, 16, 4, 2, _D64),
        # Issue 18: 16-query steps, wider key blocks (dK/dV products m64n64/n128 instead of 32x64's n16/n32);
        # 64x32x8w (measured slowest at the vision shape, 1.511 ms) made room (at most 5 candidates per class).
        _dkdv(16, 128, 8, 2, _D64),
        _dkdv(16, 64, 4, 3, _D64),  # non-causal only (_FULL_ONLY)
        _dkdv(32, 64, 4, 2, _SMALL),
        _dkdv(32, 16, 4, 2, _SMALL),
        # d=128: dK1, dK2 and dV together are 4d = 512 fp32 columns per key row; 64-key blocks (wgmma) fit only
        # with the two-pass SPLIT form (2d live at a time) and 16-query steps (32x64 and 64x64 split spill).
        _dkdv(16, 64, 8, 2, _D128, min_sm=90, split=True),
        _dkdv(32, 32, 8, 2, _D128),
        # fp32 (exact path): ptxas spills 4-60 B with other warp/stage counts on one architecture or the other.
        _dkdv(16, 16, 8, 1, _ALL_D, min_sm=90, fp32=True),
        _dkdv(16, 16, 4, 2, _D64 + _D128, max_sm=89, fp32=True),
        _dkdv(16, 16, 4, 1, _SMALL, max_sm=89, fp32=True),
    ],
    "dq": [
        Row(64, 64, 8, 2, _D64, min_sm=90),  # spills 8-44 B on sm_80 since the dQ loop was split (masked / unmasked)
        Row(64, 32, 4, 2, _D64 + _SMALL),
        Row(32, 64, 4, 2, _D64),  # spills 12-36 B at d=32
        Row(128, 64, 8, 2, _D64, min_sm=90),  # issue 18: 128 queries per program (m64n64 QKᵀ/dP products)
        # d=64 since issue 18 (2 programs per SM on sm_90); spills 40-108 B at d=64 on sm_80, hence Hopper-only (small
        # head dims on sm_80 keep 64x32x4w and 32x32x4w)
        Row(64, 64, 4, 2, _D64 + _SMALL, min_sm=90),
        Row(32, 32, 4, 2, _SMALL),
        Row(64, 32, 8, 2, _D128),
        Row(32, 64, 8, 2, _D128),
        Row(16, 16, 4, 1, _D64 + _D128, fp32=True),
        # fp32, d = 16/32: 16x16x4w spilled 12 B causal on sm_80 (Triton 3.8) once the head layouts' strides were
        # added (ptxas chose 72 registers and a stack frame); 8 warps are clean on sm_80/sm_90 with 3.6 and 3.8
        Row(16, 16, 8, 1, _SMALL, fp32=True),
    ],
    # dK/dV and dQ in one launch (kernels/bwd_fused.py), deterministic and atomic forms: see FUSED_ROWS above.
    "fused": FUSED_ROWS,
    "atomic": ATOMIC_ROWS,
}
KERNELS = ("fwd", "dkdv", "dq")  # one launch each in the default path (benchmarks record a config per kernel)
ALL_KERNELS = tuple(ROWS)  # + "fused", "atomic": launched only by those backward forms (`bwd_form`)


def _side_table():
    table = {}
    for kernel, rows in ROWS.items():
        table[kernel] = {}
        for row in rows:
            if row.key in table[kernel]:  # one block shape, one row: merge head dims instead of duplicating it
                raise RuntimeError(f"duplicate {kernel} row {row.key} in kernels/configs.py")
            table[kernel][row.key] = row
    return table


_ROW_BY_KEY = _side_table()

# The fixed row of a problem class (kernel, compute capability, head dim, bytes per input element) where a device
# sweep measured one: the H200 run of 2026-11-28 (benchmarks/results/2026-11-28-h200/bench_diff_attn.log; the
# reduced sweep at DiffCLIP's vision shape B=256 H=6 N=197 d=64, bf16, non-causal; benchmarks/NOTES.md). Each row
# was timed with the other kernels fixed: forward 128x32x8w 0.370 ms (next 0.510); dK/dV 32x32x4w 1.199 ms (the
# first row then, 32x64x8w, 1.438); dQ 64x32x4w 1.188 ms (the first row then, 64x64x8w, 1.438). Applied to the
# whole class (causal and other lengths too: no other measurement exists) where the row fits the problem.
MEASURED_WINNERS = {
    ("fwd", 90, 64, 2): (128, 32, 8, 2, None),
    ("dkdv", 90, 64, 2): (32, 32, 4, 2, False),
    ("dq", 90, 64, 2): (64, 32, 4, 2, None),
}
for (_kernel, *_), _key in MEASURED_WINNERS.items():
    if _key not in _ROW_BY_KEY[_kernel]:  # a winner must stay in its list (it is compiled and checked there)
        raise RuntimeError(f"measured {_kernel} winner {_key} is not a row of kernels/configs.py")

INTERPRET = {
    "fwd": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    "dkdv": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT": False}, num_warps=4, num_stages=1),
    "dq": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    "fused": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT": False}, num_warps=4, num_stages=1),
    "atomic": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT": False}, num_warps=4, num_stages=1),
}


def row_of(kernel: str, cfg: triton.Config) -> Row | None:
    """The row a config came from (None for the interpreter's config)."""
    return _ROW_BY_KEY[kernel].get(config_key(cfg))


def autotune_configs(kernel: str) -> list:
    """The candidates handed to `triton.autotune` for one kernel."""
    return [INTERPRET[kernel]] if interpreter_enabled() else [r.config() for r in ROWS[kernel]]


@dataclass(frozen=True)
class Problem:
    """What a config choice depends on."""

    head_dim: int
    dtype_bytes: int
    causal: bool
    seqlen: int
    sm: int
    # Head-layout variants (kernels.diff_attn's head_layout, GQA) that change the compiled kernels: GQA (a group loop
    # in the dK/dV programs), v2 (a d-wide value, one K tile for both maps) and split (a "halves" value addressed
    # in two halves). The rows are sized for the default (all False); _VARIANT_SPILLS lists where that fails.
    gqa: bool = False
    v2: bool = False
    split: bool = False


def row_fits(kernel: str, row: Row, p: Problem) -> bool:
    """Whether a row is legal and worth trying for this problem."""
    wider = _VARIANT_ROWS.get((kernel, row.key))
    if wider is not None and _flags_on(p, wider[0]):
        row = dataclasses.replace(row, **wider[1])
    if p.head_dim not in row.head_dims or not row.min_sm <= p.sm <= row.max_sm or row.fp32 != (p.dtype_bytes == 4):
        return False
    # The forward's causal split must be BLOCK_N-aligned (a static_assert in the kernel says so too); the
    # backward's loops need no alignment.
    if kernel == "fwd" and p.causal and row.block_m % row.block_n != 0:
        return False
    if not row.min_seqlen <= p.seqlen <= row.max_seqlen or row.causal not in (None, p.causal):
        return False
    if p.causal and (kernel, row.key) in _FULL_ONLY:
        return False
    if (p.gqa or p.v2 or p.split) and _variant_excluded(kernel, row, p):
        return False
    return not (row.block_m > 64 and p.seqlen <= 64)  # short sequences: a 128-row block would be mostly masked


def _flags_on(p: Problem, flags: str) -> bool:
    return all(getattr(p, f) for f in flags.split("+"))


def _variant_excluded(kernel: str, row: Row, p: Problem) -> bool:
    return any(_flags_on(p, flags) and p.sm <= max_sm for flags, max_sm in _VARIANT_SPILLS.get((kernel, row.key), ()))


def fitting_rows(kernel: str, p: Problem) -> list:
    """The rows autotuning may pick for this problem, in preference order."""
    return [r for r in ROWS[kernel] if row_fits(kernel, r, p)]
