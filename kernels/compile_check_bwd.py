"""Ahead-of-time compile report of the backward's main kernels, with the wgmma instruction shapes (issue 18).

`kernels.compile_check` (shared with the forward) compiles the default rows of every kernel; this adds the one-launch
backward (`fused`, and its opt-in atomic variant `atomic`) and, per row, the shapes of the warpgroup MMAs in the PTX
(`m64n16k16 x32` = 32 sites of that shape): a row whose products are mostly n16 runs the tensor cores at a fraction
of their width.

    python -m kernels.compile_check_bwd [--kernels dkdv,dq,fused,atomic] [--archs 90] [--dtypes bf16]
        [--head-dims 64] [--causal both|yes|no] [--rows 16x64x4x3,...] [--variant gqa|v2|v2gqa] [--json out.json]

--variant compiles a head-layout variant (compile_check.VARIANTS: GQA's runtime GROUP, the v2 layout) instead of the
default specialisation (GROUP = 1, interleaved heads); its rows are named e.g. "fused_gqa".

--rows compiles the given rows (BLOCK_MxBLOCK_NxWARPS[xSTAGES][s], trailing "s" = SPLIT) instead of the lists of
kernels/configs.py (candidate sweeps). Run it with Triton 3.6 (the GPU image's) as
`PYTHONPATH=<triton-3.6 dir>:. python -m kernels.compile_check_bwd ...` (README, Tests: the side install).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import triton

from . import configs
from .compile_check import (SMEM_LIMIT, VARIANTS, _aligned_strides, _bwd_signature, _compile, compile_bwd, mma_kind,
                            mma_shapes, ptxas_report)
from .runtime import interpreter_enabled

KERNELS = ("dkdv", "dq", "fused", "atomic")


@dataclasses.dataclass
class BwdCompileResult:
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
    mma: str
    mma_shapes: str  # instruction shapes with their site counts, as compile_check reports them (`mma_shapes`)

    @property
    def clean(self) -> bool:
        return self.spill_stores == 0 and self.spill_loads == 0 and self.shared <= SMEM_LIMIT[self.arch]


def compile_fused(arch, dtype, head_dim, causal, cfg, atomic, group=1, head_layout="interleaved"):
    from .bwd_fused import _bwd_fused_kernel as fn

    ptrs = {a: "x" for a in ("Q", "K", "V", "DO", "DK", "DV")}
    ptrs.update({"LSE": "*fp32", "DELTA": "*fp32", "LAM": "*fp32", "DQ": "*fp32" if atomic else "x"})
    sig, const = _bwd_signature(fn, dtype, head_dim, causal, cfg, ptrs, group, head_layout)
    const.update({"ARCH": arch, "DQ_ATOMIC": atomic})
    return _compile(fn, sig, const, arch, cfg, _aligned_strides(fn))


def compile_one(kernel, arch, dtype, head_dim, causal, cfg, variant=None) -> BwdCompileResult:
    group, layout = VARIANTS[variant] if variant else (1, "interleaved")
    if kernel in ("dkdv", "dq"):
        compiled = compile_bwd(kernel, arch, dtype, head_dim, causal, cfg, group, layout)
    else:
        compiled = compile_fused(arch, dtype, head_dim, causal, cfg, kernel == "atomic", group, layout)
    ptx = compiled.asm["ptx"]
    regs, stores, loads = ptxas_report(ptx, arch)
    name = f"{kernel}_{variant}" if variant else kernel
    return BwdCompileResult(name, arch, dtype, head_dim, causal, configs.describe(cfg), compiled.metadata.shared,
                            regs, stores, loads, mma_kind(ptx), mma_shapes(ptx))


def parse_row(text: str) -> triton.Config:
    """"16x64x4x3s" -> BLOCK_M=16 BLOCK_N=64, 4 warps, 3 stages, SPLIT."""
    split = text.endswith("s")
    parts = [int(x) for x in text.rstrip("s").split("x")]
    bm, bn, warps = parts[:3]
    stages = parts[3] if len(parts) > 3 else 2
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT": split}, num_warps=warps, num_stages=stages)


def listed_configs(kernel, arch, dtype, head_dim, causal, seqlen=4096):
    p = configs.Problem(head_dim, 4 if dtype == "fp32" else 2, causal, seqlen, arch)
    return [r.config() for r in configs.fitting_rows(kernel, p)]


def collect(kernels=KERNELS, archs=(80, 90), dtypes=("fp16", "bf16", "fp32"), head_dims=(16, 32, 64, 128),
            causals=(False, True), rows=None, variant=None):
    out = []
    for kernel in kernels:
        for arch in archs:
            for dtype in dtypes:
                for d in head_dims:
                    for causal in causals:
                        cfgs = rows if rows is not None else listed_configs(kernel, arch, dtype, d, causal)
                        for cfg in cfgs:
                            if kernel == "dq" and "SPLIT" in cfg.kwargs:
                                cfg = triton.Config({k: v for k, v in cfg.kwargs.items() if k != "SPLIT"},
                                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                            out.append(compile_one(kernel, arch, dtype, d, causal, cfg, variant))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", type=lambda s: tuple(s.split(",")), default=KERNELS)
    p.add_argument("--archs", type=lambda s: tuple(int(x) for x in s.split(",")), default=(80, 90))
    p.add_argument("--dtypes", type=lambda s: tuple(s.split(",")), default=("fp16", "bf16", "fp32"))
    p.add_argument("--head-dims", type=lambda s: tuple(int(x) for x in s.split(",")), default=(16, 32, 64, 128))
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--rows", type=lambda s: [parse_row(x) for x in s.split(",")])
    p.add_argument("--variant", choices=tuple(VARIANTS))
    p.add_argument("--json")
    args = p.parse_args(argv)
    if interpreter_enabled():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's @triton.jit objects cannot be compiled")
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    results = collect(args.kernels, args.archs, args.dtypes, args.head_dims, causals, args.rows, args.variant)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
        return
    print(f"# triton {triton.__version__}")
    print(f"{'kernel':7} {'sm':>3} {'dtype':5} {'d':>4} {'causal':6} {'config':34} {'smem':>7} {'regs':>4} "
          f"{'spills':9} {'mma':8} wgmma shapes")
    for r in results:
        print(f"{r.kernel:7} {r.arch:>3} {r.dtype:5} {r.head_dim:>4} {str(r.causal):6} {r.config:34} {r.shared:>7} "
              f"{r.registers:>4} {f'{r.spill_stores}/{r.spill_loads}':9} {r.mma:8} {r.mma_shapes}", flush=True)


if __name__ == "__main__":
    main()
