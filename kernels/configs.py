"""Autotune lists for the differential-attention kernels, the filters that prune them, and the launch policy
(autotuned, fixed, or forced config).

The rows themselves are in kernels/config_rows.py (re-exported here). Under Triton's interpreter a single config is
used (autotuning there would only measure numpy).

Launch policy (`launch`): a forced config, else a fixed config (deterministic mode, DIFF_ATTN_AUTOTUNE=0), else the
config autotuning chose for the problem's key, recorded here per kernel. The record, not Triton's own cache, is what
later launches use: one choice per key whatever the forward saves for backward, and no benchmarking while a CUDA graph
is being captured (see `launch`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings

import torch
import triton

from .runtime import interpreter_enabled

from .config_rows import (  # noqa: F401  (re-exported: the rows are part of this module's interface)
    _ALL_D, _D64, _D128, _FULL_ONLY, _ROW_BY_KEY, _SHORT, _SMALL, ALL_KERNELS, ATOMIC_ROWS, FUSED_ROWS, INTERPRET,
    KERNELS, LONG, MEASURED_WINNERS, ROWS, Problem, Row, _dkdv, autotune_configs, config_key, fitting_rows, row_fits,
    row_of,
)


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
    no spill-free row (fp32 inputs on a GPU; a few head-layout variants, config_rows._VARIANT_SPILLS, e.g. halves + GQA
    at d = 128 on sm_80) runs separate, with a RuntimeWarning saying so; under the interpreter every form runs (one
    config serves all)."""
    form = os.environ.get("DIFF_ATTN_BWD", "separate").strip().lower() or "separate"
    if form not in BWD_FORMS:
        raise ValueError(f"DIFF_ATTN_BWD={form!r}: expected one of {', '.join(BWD_FORMS)}")
    if form == "atomic" and deterministic_enabled():
        form = "fused"
    if form != "separate" and p is not None and form not in _forced and not interpreter_enabled() \
            and not _has_rows(form, p):
        # Not silent: the caller asked for this form. (The warnings registry shows each message once per place.)
        warnings.warn(f"DIFF_ATTN_BWD={form}: no spill-free {form} row fits this problem ({p}); running the separate "
                      "backward (kernels/config_rows.py)", RuntimeWarning, stacklevel=3)
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


def fwd_may_split(p: Problem, recorded: "triton.Config | None" = None) -> bool:
    """Whether a forward launch for `p` may run a SPLIT row, which needs its fp32 scratch buffer: the forced config
    says so; otherwise the config autotuning recorded for the launch's key (`recorded_config`) does, and before the
    key is tuned any fitting SPLIT row does (autotuning may pick it); in fixed mode the fixed row. The interpreter's
    own config is not SPLIT. (So after tuning, a key whose choice is a fused row allocates no scratch.)"""
    if "fwd" in _forced:
        return bool(_forced["fwd"].kwargs.get("SPLIT"))
    if interpreter_enabled():
        return False
    if deterministic_enabled() or not autotune_enabled():
        return bool(_fixed_row("fwd", p).kwargs.get("SPLIT"))
    if recorded is not None:
        return bool(recorded.kwargs.get("SPLIT"))
    return _has_split_row(p)


def recorded_config(kernel: str, autotuned, args, kwargs) -> "triton.Config | None":
    """The config autotuning recorded for this launch's key (see `launch`), or None before the key is tuned."""
    tuned = _TUNED[kernel].get(tune_key(autotuned, args, kwargs))
    return tuned[0] if tuned is not None else None


@functools.lru_cache(maxsize=4096)
def _has_split_row(p: Problem) -> bool:
    return any(r.split for r in fitting_rows("fwd", p))


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
        p = Problem(int(args["HEAD_DIM"]), q.element_size(), bool(args["CAUSAL"]), int(args["N"]), int(args["ARCH"]),
                    int(args["GROUP"]) > 1, bool(args["SHARED_K"]), bool(args["V_SPLIT"]))
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


def pre_block_m(width: int) -> int:
    """Rows per backward-preprocess program for output rows of `width` (2d; d for the v2 head layout): the
    (rows x width) fp32 tiles it holds (dO, o, O2, g) stay at 4096 elements, i.e. 32 registers each for 4 warps, so
    d = 128 does not spill."""
    return 4096 // width
