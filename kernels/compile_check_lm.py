"""Ahead-of-time compilation of the language-model kernels (varlen forward/backward, decode split and combine) for
sm_80 and sm_90, without a GPU: every config of kernels/configs_lm.py, with ptxas registers, spills and shared
memory, as `kernels.compile_check` does for the dense kernels (its ptxas and MMA readers are reused).

    python -m kernels.compile_check_lm                      # table
    PYTHONPATH=<triton-3.6 dir>:. python -m kernels.compile_check_lm   # with Triton 3.6 side-installed (README)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .compile_check import SMEM_LIMIT, CompileResult, mma_kind, ptxas_report
from .configs_lm import COMBINE_ROWS, LM_ROWS, combine_warps, decode_warps, lm_rows
from .runtime import interpreter_enabled

_FP32_PTRS = {"LAM", "LSE", "DELTA", "NORM_W", "OPART", "LPART"}
_I32_PTRS = {"CU_Q", "CU_K", "SEQLENS", "LEFTPAD"}
_DATA_PTRS = {"Q", "K", "V", "OUT", "O2", "OPRE", "DO", "DK", "DV", "DQ"}
_INTS = {"H", "GROUP", "TOTAL_Q", "B", "NQ", "CHUNK", "ROW_BLOCKS", "SPLITS"}
_FLOATS = {"qk_scale", "sm_scale", "do_scale", "norm_eps", "out_scale"}


def _signature(fn, dtype, const, none_ptrs=()):
    """Types of every argument as a real launch specialises them: feature-dim strides are 1 (validated),
    pointers and the q/k/v/output strides 16-aligned (multiples of d >= 16); λ strides and sizes not assumed."""
    sig, attrs = {}, {}
    for idx, a in enumerate(fn.arg_names):
        if a in none_ptrs:
            sig[a], const[a] = "constexpr", None
        elif a in _DATA_PTRS:
            sig[a] = "*" + dtype
        elif a in _FP32_PTRS:
            sig[a] = "*fp32"
        elif a in _I32_PTRS:
            sig[a] = "*i32"
        elif a == "stride_w" or (a.startswith("stride_") and a.endswith("d") and len(a) == 9):
            sig[a], const[a] = "constexpr", 1
        elif a.startswith("stride_") or a in _INTS:
            sig[a] = "i32"
        elif a in _FLOATS:
            sig[a] = "fp32"
        else:
            sig[a] = "constexpr"
        aligned = a.startswith("stride_") and not a.startswith("stride_l") and sig[a] == "i32"
        if sig[a].startswith("*") or aligned:
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def _compile_one(kernel, fn, arch, dtype, const, warps, stages, none_ptrs=(), causal=False, label=""):
    sig, const, attrs = _signature(fn, dtype, dict(const), none_ptrs)
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    regs, stores, loads = ptxas_report(compiled.asm["ptx"], arch)
    d = const["HEAD_DIM"]
    return CompileResult(kernel, arch, dtype, d, causal, label, compiled.metadata.shared, regs, stores, loads,
                         mma_kind(compiled.asm["ptx"]))


def _prec(dtype):
    return "ieee" if dtype == "fp32" else "tf32"


def _class(arch, dtype, d, only=None):
    from . import decode, varlen, varlen_bwd

    def want(kernel):  # --only: quick reruns of some kernels
        return only is None or kernel in only

    nbytes = 4 if dtype == "fp32" else 2
    out = []
    for row in lm_rows("varlen_fwd", d, nbytes, arch) if want("varlen_fwd") else ():
        blocks = {"BLOCK_M": row.block_m, "BLOCK_N": row.block_n}
        label = f"BLOCK_M={row.block_m} BLOCK_N={row.block_n} w={row.warps} s={row.stages}"
        for causal in (False, True):
            const = {"HEAD_DIM": d, "CAUSAL": causal, "HAS_NORM": True, "SAVE_FOR_BWD": True,
                     "DOT_PRECISION": _prec(dtype), **blocks}
            out.append(_compile_one("varlen_fwd", varlen._varlen_fwd_kernel, arch, dtype, const, row.warps,
                                    row.stages, causal=causal, label=label))
        const = {"HEAD_DIM": d, "CAUSAL": True, "HAS_NORM": False, "SAVE_FOR_BWD": False,
                 "DOT_PRECISION": _prec(dtype), **blocks}
        out.append(_compile_one("varlen_fwd_infer", varlen._varlen_fwd_kernel, arch, dtype, const, row.warps,
                                row.stages, none_ptrs=("NORM_W", "LSE", "O2", "OPRE"), causal=True, label=label))
    for kernel, fn in (("varlen_dkdv", varlen_bwd._varlen_dkdv_kernel), ("varlen_dq", varlen_bwd._varlen_dq_kernel)):
        for row in lm_rows(kernel, d, nbytes, arch) if want(kernel) else ():
            label = f"BLOCK_M={row.block_m} BLOCK_N={row.block_n} w={row.warps} s={row.stages}"
            for causal in (False, True):
                const = {"HEAD_DIM": d, "CAUSAL": causal, "DOT_PRECISION": _prec(dtype),
                         "BLOCK_M": row.block_m, "BLOCK_N": row.block_n}
                out.append(_compile_one(kernel, fn, arch, dtype, const, row.warps, row.stages, causal=causal,
                                        label=label))
    for row in lm_rows("decode", d, nbytes, arch) if want("decode_split") else ():
        for block_m in (16, 32, 64):  # every BLOCK_M `decode_block_m` can pick under this row's cap
            if block_m > row.block_m:
                continue
            warps = decode_warps(block_m, d, row.warps)
            # The head layouts differ in strides only (one compiled kernel); the left padding is a variant.
            for leftpad in (False, True):
                const = {"HEAD_DIM": d, "HAS_LEFTPAD": leftpad, "DOT_PRECISION": _prec(dtype), "BLOCK_M": block_m,
                         "BLOCK_N": row.block_n}
                out.append(_compile_one("decode_split_leftpad" if leftpad else "decode_split",
                                        decode._decode_split_kernel, arch, dtype, const, warps, row.stages,
                                        none_ptrs=() if leftpad else ("LEFTPAD",), causal=True,
                                        label=f"BLOCK_M={block_m} BLOCK_N={row.block_n} w={warps} s={row.stages}"))
    for has_norm in (False, True) if want("decode_combine") else ():
        const = {"HEAD_DIM": d, "HAS_NORM": has_norm, "BLOCK_R": COMBINE_ROWS}
        warps = combine_warps(d)
        out.append(_compile_one("decode_combine", decode._decode_combine_kernel, arch, dtype, const, warps, 1,
                                none_ptrs=() if has_norm else ("NORM_W",),
                                label=f"BLOCK_R={COMBINE_ROWS} norm={int(has_norm)} w={warps} s=1"))
    return out


ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (16, 32, 64, 128)


def collect(archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS, jobs=1, only=None):
    classes = [(a, t, d, only) for a in archs for t in dtypes for d in head_dims]
    if jobs <= 1:
        parts = [_class(*c) for c in classes]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            parts = list(pool.map(_class, *zip(*classes)))
    return [r for part in parts for r in part]


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here instead of printing a table")
    parser.add_argument("--archs", type=_ints, default=ARCHS)
    parser.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), default=DTYPES)
    parser.add_argument("--head-dims", type=_ints, default=HEAD_DIMS)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--only", type=lambda s: tuple(s.split(",")), default=None,
                        help="keep these kernels' rows, e.g. decode_split,decode_combine")
    args = parser.parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's @triton.jit objects cannot be compiled")
    results = collect(args.archs, args.dtypes, args.head_dims, args.jobs, args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": [dataclasses.asdict(r) for r in results]}, f, indent=1)
        return
    print(f"triton {triton.__version__}; rows of {sorted(LM_ROWS)}")
    print(f"{'kernel':16} {'sm':>3} {'dtype':5} {'d':>4} {'causal':6} {'config':36} {'smem':>7} {'regs':>4} "
          f"{'spills':7} mma")
    for r in results:
        flag = "" if r.spill_stores == 0 and r.spill_loads == 0 and r.shared <= SMEM_LIMIT[r.arch] else "  <-- FAIL"
        print(f"{r.kernel:16} {r.arch:>3} {r.dtype:5} {r.head_dim:>4} {str(r.causal):6} {r.config:36} "
              f"{r.shared:>7} {r.registers:>4} {f'{r.spill_stores}/{r.spill_loads}':7} {r.mma}{flag}")


if __name__ == "__main__":
    main()
