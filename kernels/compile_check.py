"""Ahead-of-time compilation of the kernels for NVIDIA targets, without a GPU.

Triton's interpreter accepts code that a GPU build rejects (layouts, shared memory, register pressure); compiling
every default config for sm_80 and sm_90 here is what catches that on a CPU-only machine. ptxas (shipped inside
Triton) reports registers and spills.

    python -m kernels.compile_check          # table of every default config

Kernels are compiled as a launch at DiffCLIP's shapes specialises them: Hkv == H gives GROUP = 1, which Triton
turns into a constant (an int argument equal to 1 always is), interleaved heads (V_WIDTH = 2d, SHARED_K off).
The head-layout variants (VARIANTS) are compiled for the default rows at d = 64 and 128 (the language-model head
dims) too: "gqa" (GROUP > 1, a runtime int: the dK/dV program's loop over a group's diff-heads), "v2" (V_WIDTH = d,
one K tile for both maps) and "v2gqa". The "halves" layout needs no row of its own: it differs from "interleaved"
only in the values of the runtime pair/split strides (kernels/layouts.py), i.e. it runs the very same binary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs
from .runtime import interpreter_enabled

# Shared memory per block that a kernel may use (opt-in maximum), in bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_TL_DTYPE = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}


@dataclass
class CompileResult:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    causal: bool
    config: str
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    mma: str  # tensor-core instruction in the PTX: "wgmma" (Hopper warpgroup MMA), "mma.sync" (Ampere) or "none"
    # instruction shapes and how many sites of each in the PTX, e.g. "m64n64k16x16 m64n32k16x8" (see mma_shapes)
    mma_shapes: str = ""

    @property
    def smem_ok(self) -> bool:
        return self.shared <= SMEM_LIMIT[self.arch]


def _ptxas_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill stores, spill loads) summed over the PTX's functions, from `ptxas -v`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        proc = subprocess.run(
            [_ptxas_path(), "-v", f"--gpu-name={sm}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = proc.stderr + proc.stdout
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    return regs, stores, loads


def _divisibility_attrs(fn, signature, aligned_ints):
    """What Triton's launcher specialises on a real call: 16-byte aligned pointers, and ints divisible by 16.

    Without these hints the compiler cannot vectorise loads and keeps one 64-bit pointer per element, which is
    not what a launch on a GPU compiles.
    """
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        ty = signature[name]
        if (ty.startswith("*") and ty != "constexpr") or name in aligned_ints:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _compile(fn, signature, constexprs, arch, cfg, aligned_ints=()):
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                    attrs=_divisibility_attrs(fn, signature, set(aligned_ints)))
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def _ptr(dtype):
    return "*" + _TL_DTYPE[dtype]


# name -> (GROUP, head layout) of the head-layout variants (module docstring). GROUP > 1 compiles as a runtime int.
VARIANTS = {"gqa": (4, "interleaved"), "v2": (1, "v2"), "v2gqa": (4, "v2")}
VARIANT_HEAD_DIMS = (64, 128)


def _layout_consts(sig, const, head_dim, group, head_layout):
    """GROUP (a constant 1, as Triton specialises it, else a runtime int), V_WIDTH and SHARED_K."""
    if group == 1:
        sig["GROUP"], const["GROUP"] = "constexpr", 1
    else:
        sig["GROUP"] = "i32"
    const["V_WIDTH"] = head_dim if head_layout == "v2" else 2 * head_dim
    const["SHARED_K"] = head_layout == "v2"


def compile_fwd(arch, dtype, head_dim, causal, cfg, *, has_norm=True, save_for_bwd=True, group=1,
                head_layout="interleaved"):
    from .fwd import _diff_attn_fwd_kernel as fn

    p = _ptr(dtype)
    sig = {
        "Q": p, "K": p, "V": p, "LAM": "*fp32", "NORM_W": "*fp32" if has_norm else "constexpr", "OUT": p,
        "LSE": "*fp32" if save_for_bwd else "constexpr", "O2": p if save_for_bwd else "constexpr",
        "OPRE": p if (save_for_bwd and has_norm) else "constexpr",
        "O2F": "*fp32" if cfg.kwargs.get("SPLIT") else "constexpr",  # the SPLIT form's scratch
    }
    ints = [a for a in fn.arg_names if a.startswith("stride_")] + ["H", "N", "N_BUCKET", "GRID_BUCKET"]
    sig.update({a: "i32" for a in ints})
    sig.update({"qk_scale": "fp32", "norm_eps": "fp32", "out_scale": "fp32"})
    const = {
        "HEAD_DIM": head_dim, "CAUSAL": causal, "HAS_NORM": has_norm, "SAVE_FOR_BWD": save_for_bwd,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "ARCH": arch, "SPLIT": False, **cfg.kwargs,
    }
    for name in ("NORM_W", "LSE", "O2", "OPRE", "O2F"):
        if sig[name] == "constexpr":
            const[name] = None
    # Strides along the feature dim are 1 in every real call; Triton specialises them, so do the same here.
    for a in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_w"):
        sig[a] = "constexpr"
        const[a] = 1
    _layout_consts(sig, const, head_dim, group, head_layout)
    sig.update({k: "constexpr" for k in const if k not in sig})
    ordered = {a: sig[a] for a in fn.arg_names}
    return _compile(fn, ordered, const, arch, cfg, _aligned_strides(fn))


def _aligned_strides(fn):
    # Batch/head/row strides of q, k, v, dO and the gradients are multiples of d (>= 16) in every layout a model
    # produces; λ's strides (often 0) and N are not assumed aligned.
    return [a for a in fn.arg_names if a.startswith("stride_") and not a.startswith("stride_l")
            and not a.endswith("d") and a != "stride_w"]


def _bwd_signature(fn, dtype, head_dim, causal, cfg, pointers, group=1, head_layout="interleaved"):
    p = _ptr(dtype)
    sig, const = {}, {"HEAD_DIM": head_dim, "CAUSAL": causal,
                      "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", **cfg.kwargs}
    if "GROUP" in fn.arg_names:
        _layout_consts(sig, const, head_dim, group, head_layout)
    for a in fn.arg_names:
        if a in sig:
            continue
        if a in pointers:
            sig[a] = pointers[a] if pointers[a].startswith("*") else p
        elif (a.startswith("stride_") and a.endswith("d") and a != "stride_lb") or a == "stride_w":
            sig[a], const[a] = "constexpr", 1  # feature-dim strides are 1 in real calls (Triton specialises 1)
        elif a.startswith("stride_") or a in ("H", "N", "N_BUCKET", "GRID_BUCKET"):
            sig[a] = "i32"
        elif a in ("qk_scale", "sm_scale", "do_scale", "norm_eps", "out_scale"):
            sig[a] = "fp32"
        else:
            sig[a] = "constexpr"
    return sig, const


def compile_bwd(kernel, arch, dtype, head_dim, causal, cfg, group=1, head_layout="interleaved"):
    """Compile the dK/dV ("dkdv") or dQ ("dq") backward kernel for one config."""
    from . import bwd

    fn = bwd._bwd_dkdv_kernel if kernel == "dkdv" else bwd._bwd_dq_kernel
    ptrs = {a: "x" for a in ("Q", "K", "V", "DO", "DK", "DV", "DQ")}
    ptrs.update({"LSE": "*fp32", "DELTA": "*fp32", "LAM": "*fp32"})
    sig, const = _bwd_signature(fn, dtype, head_dim, causal, cfg, ptrs, group, head_layout)
    const["ARCH"] = arch
    return _compile(fn, sig, const, arch, cfg, _aligned_strides(fn))


def compile_preprocess(arch, dtype, head_dim, has_norm=True):
    from . import bwd

    fn = bwd._bwd_preprocess_kernel
    cfg = triton.Config({"BLOCK_M": configs.pre_block_m(2 * head_dim)}, num_warps=4, num_stages=1)
    ptrs = {a: "x" for a in ("DOUT", "OREF", "O2", "DO")}
    ptrs.update({"LAM": "*fp32", "NORM_W": "*fp32", "DELTA": "*fp32", "DW_PART": "*fp32", "DLAM": "*fp32"})
    sig, const = _bwd_signature(fn, dtype, head_dim, False, cfg, ptrs)
    for a in ("CAUSAL", "DOT_PRECISION", "HEAD_DIM"):
        const.pop(a)
    const["WIDTH"] = 2 * head_dim
    const.update({"HAS_NORM": has_norm, "NEED_DW": has_norm, "NEED_DLAM": True})
    if not has_norm:
        for a in ("NORM_W", "DO", "DW_PART"):
            sig[a], const[a] = "constexpr", None
    return _compile(fn, sig, const, arch, cfg, _aligned_strides(fn))


def mma_kind(ptx: str) -> str:
    """The tensor-core instruction a kernel's PTX uses: "wgmma" if any product is a Hopper warpgroup MMA, else
    "mma.sync" (Ampere-style warp MMA), else "none" (e.g. fp32 ieee dots run on the FMA units)."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "none"


_MMA_SHAPE = re.compile(r"\b(?:wgmma\.mma_async|mma)\.sync\.aligned\.(m\d+n\d+k\d+)\b")


def mma_shapes(ptx: str) -> str:
    """The tensor-core instruction shapes in a kernel's PTX with their site counts, most frequent first:
    "m64n64k16x16 m64n32k16x8" (wgmma: M is always 64 per warpgroup, N is the tile's width, up to 256; mma.sync:
    m16n8k16 and the like). Sites in the PTX, not executions: an unrolled loop body counts each copy. "" if none."""
    counts = {}
    for shape in _MMA_SHAPE.findall(ptx):
        counts[shape] = counts.get(shape, 0) + 1
    return " ".join(f"{s}x{n}" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _result(kernel, compiled, arch, dtype, head_dim, causal, cfg):
    ptx = compiled.asm["ptx"]
    regs, stores, loads = ptxas_report(ptx, arch)
    return CompileResult(
        kernel, arch, dtype, head_dim, causal,
        configs.describe(cfg),
        compiled.metadata.shared, regs, stores, loads, mma_kind(ptx), mma_shapes(ptx),
    )


def default_configs(kernel, arch, dtype, head_dim, causal, seqlens=(197, 4096)):
    """The configs autotuning may pick on `arch` for one problem class (the lists of kernels/configs.py, pruned) at
    any of `seqlens`: short-sequence rows and the rows for long sequences (configs.LONG) alike."""
    rows = []
    for n in seqlens:
        p = configs.Problem(head_dim, 4 if dtype == "fp32" else 2, causal, n, arch)
        rows += [r for r in configs.fitting_rows(kernel, p) if r not in rows]
    return [r.config() for r in rows]


def check_fwd(arch, dtype, head_dim, causal):
    """Compile every default forward config for one problem class; one CompileResult per config."""
    return [
        _result("fwd", compile_fwd(arch, dtype, head_dim, causal, cfg), arch, dtype, head_dim, causal, cfg)
        for cfg in default_configs("fwd", arch, dtype, head_dim, causal)
    ]


def check_fwd_inference(arch, dtype, head_dim, causal):
    """The forward without the norm epilogue and without saving for backward (plain inference)."""
    return [
        _result("fwd_infer", compile_fwd(arch, dtype, head_dim, causal, cfg, has_norm=False, save_for_bwd=False),
                arch, dtype, head_dim, causal, cfg)
        for cfg in default_configs("fwd", arch, dtype, head_dim, causal)
    ]


def check_bwd(kernel, arch, dtype, head_dim, causal):
    """Compile every default config of the "dkdv" or "dq" backward kernel for one problem class."""
    return [
        _result(kernel, compile_bwd(kernel, arch, dtype, head_dim, causal, cfg), arch, dtype, head_dim, causal, cfg)
        for cfg in default_configs(kernel, arch, dtype, head_dim, causal)
    ]


def check_variant(name, arch, dtype, head_dim, causal):
    """The forward, dK/dV and dQ default configs of one head-layout variant (VARIANTS); kernels named e.g.
    "fwd_gqa", "dkdv_v2"."""
    group, layout = VARIANTS[name]
    out = [_result(f"fwd_{name}", compile_fwd(arch, dtype, head_dim, causal, cfg, group=group, head_layout=layout),
                   arch, dtype, head_dim, causal, cfg)
           for cfg in default_configs("fwd", arch, dtype, head_dim, causal)]
    for kernel in ("dkdv", "dq"):
        out += [_result(f"{kernel}_{name}", compile_bwd(kernel, arch, dtype, head_dim, causal, cfg, group, layout),
                        arch, dtype, head_dim, causal, cfg)
                for cfg in default_configs(kernel, arch, dtype, head_dim, causal)]
    return out


def check_preprocess(arch, dtype, head_dim, has_norm=True):
    cfg = triton.Config({"BLOCK_M": configs.pre_block_m(2 * head_dim)}, num_warps=4, num_stages=1)
    return _result("bwd_pre", compile_preprocess(arch, dtype, head_dim, has_norm), arch, dtype, head_dim, False, cfg)


ARCHS = (80, 90)
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (16, 32, 64, 128)


def _collect_class(arch, dtype, d, variants=()):
    out = [check_preprocess(arch, dtype, d, has_norm=False), check_preprocess(arch, dtype, d, has_norm=True)]
    out += check_fwd_inference(arch, dtype, d, causal=False)
    for causal in (False, True):
        out += check_fwd(arch, dtype, d, causal)
        for kernel in ("dkdv", "dq"):
            out += check_bwd(kernel, arch, dtype, d, causal)
    if d in VARIANT_HEAD_DIMS:
        for name in variants:
            for causal in (False, True):
                out += check_variant(name, arch, dtype, d, causal)
    return out


def collect(archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS, jobs=1, variants=tuple(VARIANTS)):
    """Compile every default config of every kernel for each problem class (and of the head-layout `variants` at
    VARIANT_HEAD_DIMS); a list of CompileResult, in a fixed order. `jobs` > 1 compiles problem classes in parallel
    processes (compilation is CPU-bound)."""
    classes = [(a, t, d, tuple(variants)) for a in archs for t in dtypes for d in head_dims]
    if jobs <= 1:
        parts = [_collect_class(*c) for c in classes]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            parts = list(pool.map(_collect_class, *zip(*classes)))
    return [r for part in parts for r in part]


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here instead of printing a table")
    parser.add_argument("--archs", type=_ints, default=ARCHS, help="comma-separated, e.g. 80,90")
    parser.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), default=DTYPES, help="e.g. fp16,bf16")
    parser.add_argument("--head-dims", type=_ints, default=HEAD_DIMS, help="e.g. 64,128")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--variants", type=lambda s: tuple(x for x in s.split(",") if x), default=tuple(VARIANTS),
                        help=f"head-layout variants to add, comma-separated, of {','.join(VARIANTS)} ('' for none)")
    args = parser.parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's @triton.jit objects cannot be compiled")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
    results = collect(args.archs, args.dtypes, args.head_dims, args.jobs, args.variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
        return
    print(f"{'kernel':9} {'sm':>3} {'dtype':5} {'d':>4} {'causal':6} {'config':42} {'smem':>7} {'regs':>4} "
          f"{'spills':7} {'mma':8} shapes")
    for r in results:
        print(f"{r.kernel:9} {r.arch:>3} {r.dtype:5} {r.head_dim:>4} {str(r.causal):6} "
              f"{r.config:42} {r.shared:>7} {r.registers:>4} {f'{r.spill_stores}/{r.spill_loads}':7} {r.mma:8} "
              f"{r.mma_shapes}")


if __name__ == "__main__":
    main()
