"""Autotune lists for the differential-attention kernels, the filters that prune them, and the launch policy
(autotuned, fixed, or forced config).

The lists are small on purpose: every entry is compiled ahead of time for sm_80 and sm_90 by the compile test
(tests/kernels/test_compile.py), which checks shared memory and that ptxas reports no spills. Under Triton's
interpreter a single config is used (autotuning there would only measure numpy).

Launch policy (`launch`): a forced config, else a fixed config (deterministic mode, DIFF_ATTN_AUTOTUNE=0), else the
config autotuning chose for the problem's key, recorded here per kernel. The record, not Triton's own cache, is what
later launches use: one choice per key whatever the forward saves for backward, and no benchmarking while a CUDA graph
is being captured (see `launch`).

Row metadata (head dims, minimum architecture, dtype class) lives in a side table keyed by the block shape, not on
the `triton.Config` objects: Triton's on-disk autotune cache (TRITON_CACHE_AUTOTUNING=1) serialises
`config.__dict__` to JSON and rebuilds `Config(**d)`, so a Config must carry nothing but its own fields.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
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
    split: bool | None = None  # dK/dV rows only: dK and dV in two passes (the kernel's SPLIT flag)

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
# Triton 3.6 and 3.8 (NOTES 2026-12-02): the fused causal kernel has four loop bodies (dK/dV diagonal and rest, dQ
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
# (kernel, row key) that are listed for non-causal problems only (they spill causal).
_FULL_ONLY = {("fused", (32, 64, 8, 2, False)), ("fused", (16, 128, 8, 2, False)), ("fused", (32, 32, 8, 2, False)),
              ("atomic", (32, 64, 8, 2, False)),
              ("dkdv", (16, 64, 4, 3, False))}  # 4 B spills causal on sm_90 with Triton 3.8

# One forward program holds two fp32 accumulators of BLOCK_M x 2d, i.e. the registers of a plain flash-attention
# program with a 4d-wide output; d=128 therefore only gets 32/64-row blocks. Every row compiles for sm_80 and
# sm_90 without spills (checked by tests/kernels/test_compile.py; `python -m kernels.compile_check` prints them).
# The fixed config of deterministic mode and DIFF_ATTN_AUTOTUNE=0 is the measured winner where one exists
# (MEASURED_WINNERS below), else the first fitting row of the list.
ROWS = {
    "fwd": [
        Row(128, 32, 8, 2, _D64, min_sm=90),  # spills 24 B on sm_80 with Triton 3.6's ptxas: Hopper and newer only
        Row(64, 64, 8, 2, _D64 + _SMALL),
        Row(64, 64, 8, 3, _D64 + _SMALL),
        Row(64, 32, 8, 3, _D64),
        Row(32, 64, 4, 2, _D64 + _SMALL),
        Row(64, 32, 4, 2, _SMALL),
        Row(64, 16, 8, 2, _D128, min_sm=90),  # d=128 with wgmma (BLOCK_M >= 64); 64x32 spills 16-20 B causal
        Row(32, 64, 8, 2, _D128),
        Row(32, 32, 8, 3, _D128),
        Row(32, 32, 8, 2, _D128),
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
        Row(16, 16, 4, 1, _ALL_D, fp32=True),
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


def row_fits(kernel: str, row: Row, p: Problem) -> bool:
    """Whether a row is legal and worth trying for this problem."""
    if p.head_dim not in row.head_dims or not row.min_sm <= p.sm <= row.max_sm or row.fp32 != (p.dtype_bytes == 4):
        return False
    # The forward's causal split must be BLOCK_N-aligned (a static_assert in the kernel says so too); the
    # backward's loops need no alignment.
    if kernel == "fwd" and p.causal and row.block_m % row.block_n != 0:
        return False
    if p.causal and (kernel, row.key) in _FULL_ONLY:
        return False
    return not (row.block_m > 64 and p.seqlen <= 64)  # short sequences: a 128-row block would be mostly masked


def fitting_rows(kernel: str, p: Problem) -> list:
    """The rows autotuning may pick for this problem, in preference order."""
    return [r for r in ROWS[kernel] if row_fits(kernel, r, p)]


def device_sm(device: torch.device) -> int:
    """Compute capability x10 of `device` (the tensor's own GPU, not the current one); 90 under the interpreter,
    where configs are not pruned by architecture."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def autotune_enabled() -> bool:
    """DIFF_ATTN_AUTOTUNE=0 uses the fixed config of each kernel instead of timing them all (test suites on a
    GPU, where autotuning every variant would dominate the run)."""
    return os.environ.get("DIFF_ATTN_AUTOTUNE", "1").strip() != "0"


def deterministic_enabled() -> bool:
    """Fixed configs (bitwise reproducible across processes on one card and Triton version): under
    `torch.use_deterministic_algorithms(True)` or DIFF_ATTN_DETERMINISTIC=1."""
    env = os.environ.get("DIFF_ATTN_DETERMINISTIC", "0").strip().lower() in ("1", "true", "on", "yes")
    return env or torch.are_deterministic_algorithms_enabled()


BWD_FORMS = ("separate", "fused", "atomic")


def bwd_form(p: "Problem | None" = None) -> str:
    """The backward form (kernels/bwd.py): DIFF_ATTN_BWD=separate (default: dK/dV and dQ kernels), fused (both in
    one launch, deterministic) or atomic (one launch, dQ accumulated with fp32 atomic adds: less work, but dQ is not
    bitwise reproducible). atomic is opt-in only, and runs as fused in deterministic mode
    (`torch.use_deterministic_algorithms(True)` or DIFF_ATTN_DETERMINISTIC=1). A problem `p` for which the form has
    no row (fp32 inputs on a GPU) runs separate; under the interpreter every form runs (one config serves all)."""
    form = os.environ.get("DIFF_ATTN_BWD", "separate").strip().lower() or "separate"
    if form not in BWD_FORMS:
        raise ValueError(f"DIFF_ATTN_BWD={form!r}: expected one of {', '.join(BWD_FORMS)}")
    if form == "atomic" and deterministic_enabled():
        form = "fused"
    if form != "separate" and p is not None and form not in _forced and not interpreter_enabled() \
            and not _has_rows(form, p):
        form = "separate"
    return form


@functools.lru_cache(maxsize=None)
def _has_rows(kernel: str, p: "Problem") -> bool:
    return bool(fitting_rows(kernel, p))


_forced: dict = {}


@contextlib.contextmanager
def force_configs(**by_kernel):
    """Within this block, launch the named kernels ("fwd", "dkdv", "dq", "fused", "atomic") with the given
    `triton.Config`, bypassing autotuning and pruning (tests over every listed block shape; the benchmark's config
    sweep). Forcing "fused" or "atomic" does not choose that backward form: `bwd_form` does."""
    unknown = set(by_kernel) - set(ALL_KERNELS)
    if unknown:
        raise ValueError(f"force_configs: unknown kernel(s) {sorted(unknown)}; expected some of {ALL_KERNELS}")
    previous = dict(_forced)
    _forced.update(by_kernel)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(previous)


def fixed_config(kernel: str, p: Problem) -> triton.Config:
    """The config used without autotuning: forced, else the interpreter's, else the measured winner of the
    problem's class where one exists and fits (MEASURED_WINNERS), else the first fitting row."""
    if kernel in _forced:
        return _forced[kernel]
    if interpreter_enabled():
        return INTERPRET[kernel]
    return _fixed_row(kernel, p)


@functools.lru_cache(maxsize=None)  # a handful of problems per process; saves the list walk per launch
def _fixed_row(kernel: str, p: Problem) -> triton.Config:
    rows = fitting_rows(kernel, p)
    if not rows:  # every (head dim, dtype, arch) has rows; reaching this is a bug in the lists
        raise RuntimeError(f"no {kernel} config fits {p}")
    winner = MEASURED_WINNERS.get((kernel, p.sm, p.head_dim, p.dtype_bytes))
    return next((r for r in rows if r.key == winner), rows[0]).config()


# kernel -> the Config of its latest launch (benchmarks record what autotuning chose, via `describe`)
LAST_CONFIG: dict = {}


def describe(cfg: triton.Config) -> str:
    """`BLOCK_M=.. BLOCK_N=.. w=.. s=..`, the form of the compile report."""
    kw = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in cfg.kwargs.items()
                  if not (k == "SPLIT" and not v))  # SPLIT shown only when on
    return f"{kw} w={cfg.num_warps} s={cfg.num_stages}"


# kernel -> {tune key: (Config, its launch kwargs)}: what autotuning chose per key in this process. Launches read
# this record, not Triton's cache, because Triton's cache key also holds the dtype of every tensor argument: the
# training forward (LSE/O2 buffers) and the inference forward (None there) would be tuned apart and could pick
# different blocks, i.e. different bits for the same inputs (activation checkpointing recomputes under grad what
# first ran without). The key leaves SAVE_FOR_BWD out, so both share one choice, whichever ran first.
_TUNED: dict = {kernel: {} for kernel in ALL_KERNELS}


def tune_key(autotuned, args, kwargs) -> tuple:
    """The values of the autotuner's key arguments (ARCH included) and the input dtype (args[0] is Q)."""
    names = autotuned.arg_names
    return tuple(kwargs[n] if n in kwargs else args[names.index(n)] for n in autotuned.keys) + (str(args[0].dtype),)


def stream_capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (launches run under the tensors' device guard, so
    the current stream is theirs). Not asked for other devices: CUDA may not even be usable there."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _untuned_config(kernel: str, autotuned, key: tuple, p: Problem) -> triton.Config:
    """A config for a key never tuned, during a CUDA-graph capture: autotuning there would benchmark and synchronise,
    which breaks the capture. The choice of the nearest tuned key (the same problem at the closest launch size, so
    its kernel is compiled already), else the fixed config. Not recorded: a later launch outside a capture tunes."""
    gb = autotuned.keys.index("GRID_BUCKET")
    same = [(k, c) for k, (c, _) in _TUNED[kernel].items()
            if k[:gb] + k[gb + 1:] == key[:gb] + key[gb + 1:]
            and ((row := row_of(kernel, c)) is None or row_fits(kernel, row, p))]
    if same:
        near_key, cfg = min(same, key=lambda kc: (abs(math.log2(kc[0][gb]) - math.log2(key[gb])), kc[0][gb]))
        how = f"the config tuned at GRID_BUCKET={near_key[gb]} ({describe(cfg)})"
    else:
        cfg = fixed_config(kernel, p)
        how = f"the fixed config ({describe(cfg)})"
    warnings.warn(f"diff_attn: {kernel} was never autotuned for GRID_BUCKET={key[gb]} of {p} and a CUDA graph is "
                  f"being captured, where autotuning cannot run; launched with {how}. Warm up at this batch size "
                  f"outside the capture to use the tuned config", RuntimeWarning, stacklevel=4)
    return cfg


def launch(kernel: str, autotuned, grid, args, kwargs, p: Problem) -> triton.Config | None:
    """Launch one kernel by the policy: forced config > fixed config (deterministic mode or DIFF_ATTN_AUTOTUNE=0)
    > the config autotuning chose for this key (tuning it on first sight, except during a CUDA-graph capture).
    Returns the config launched with."""
    if kernel in _forced or deterministic_enabled() or not autotune_enabled():
        cfg = fixed_config(kernel, p)
        autotuned.fn[grid](*args, **kwargs, **cfg.all_kwargs())
    else:
        key = tune_key(autotuned, args, kwargs)
        tuned = _TUNED.setdefault(kernel, {}).get(key)
        if tuned is not None:
            cfg, cfg_kwargs = tuned
            autotuned.fn[grid](*args, **kwargs, **cfg_kwargs)
        elif stream_capturing(args[0].device):
            cfg = _untuned_config(kernel, autotuned, key, p)
            autotuned.fn[grid](*args, **kwargs, **cfg.all_kwargs())
        else:
            autotuned[grid](*args, **kwargs)
            cfg = autotuned.best_config
            _TUNED[kernel][key] = (cfg, cfg.all_kwargs())
    LAST_CONFIG[kernel] = cfg
    return cfg


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        p = Problem(int(args["HEAD_DIM"]), q.element_size(), bool(args["CAUSAL"]), int(args["N"]), int(args["ARCH"]))
        kept = [c for c in configs if (row := row_of(kernel, c)) is None or row_fits(kernel, row, p)]
        if not kept:
            raise RuntimeError(f"no {kernel} config fits {p}")
        return kept

    return prune


PRUNE = {kernel: _prune(kernel) for kernel in ALL_KERNELS}


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python: `triton.cdiv` is a constexpr function whose call costs microseconds on the host,
    and the launch path computes several per call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python (see `cdiv`)."""
    return 1 << (n - 1).bit_length()


def grid_bucket(batch: int, heads: int, seqlen: int) -> int:
    """Autotune key for the launch size: programs at 64-row blocks, rounded up to a power of two and capped at 4096
    (about 15 waves of two programs per SM on an H100; past that the best block stops depending on the batch).
    A first call at B=1 then does not fix the config used at B=256."""
    return min(4096, next_power_of_2(max(1, batch * heads * cdiv(seqlen, 64))))


def seqlen_bucket(n: int) -> int:
    """Autotune key for the sequence length: the next power of two (at least 16)."""
    return max(16, next_power_of_2(n))


def pre_block_m(head_dim: int) -> int:
    """Rows per backward-preprocess program: the (rows x 2d) fp32 tiles it holds (dO, o, O2, g) stay at 4096
    elements, i.e. 32 registers each for 4 warps, so d = 128 does not spill."""
    return 4096 // (2 * head_dim)
