"""The kernel calls that benchmarks/sanitize_check.sh runs under compute-sanitizer (memcheck, racecheck, initcheck,
synccheck): forward and backward, causal and not, N = 1, 77, 197, 1000, d = 64 and 128, strided inputs, the SPLIT
dK/dV row forced, fp16, bf16 and fp32.

    python benchmarks/sanitize_calls.py [--calls full|small] [--dry-run]

The calls are a covering set, not the full product (compute-sanitizer slows every launch and module load): each
value of each axis appears at least once, and the `small` list (racecheck, the slowest tool) keeps one call per
kernel form. Configs are fixed (DIFF_ATTN_AUTOTUNE=0, deterministic mode), so nothing is autotuned (timed) under the
sanitizer. Deterministic mode also makes the kernels' buffers come from `kernels/alloc.py` unfilled, and every output
is read back afterwards, so initcheck sees any element a kernel leaves unwritten.

--dry-run (no CUDA): Triton's interpreter, tiny sizes, bf16 run as fp16 (the interpreter computes bf16 on raw
bits); it tests this script's plumbing only. Exits non-zero if a call raises or gives a non-finite value.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# Fixed configs: no autotuning (benchmarking) under the sanitizer. Set before kernels is imported.
os.environ["DIFF_ATTN_AUTOTUNE"] = "0"

# name, dtype, d, N, causal, layout, norm epilogue, λ kind, SPLIT dK/dV forced, backward
CALLS = [
    ("fp16-d64-N197-full-linear-norm", "fp16", 64, 197, False, "linear", True, "head", False, True),
    ("fp16-d64-N77-causal-fused", "fp16", 64, 77, True, "fused", False, "scalar", False, True),
    ("bf16-d128-N1000-causal-linear-norm", "bf16", 128, 1000, True, "linear", True, "scalar", False, True),
    ("bf16-d128-N1-full-contiguous", "bf16", 128, 1, False, "contiguous", False, "head", False, True),
    ("bf16-d64-N1-causal-linear", "bf16", 64, 1, True, "linear", False, "scalar", False, True),
    ("bf16-d64-N1000-full-fused-token", "bf16", 64, 1000, False, "fused", False, "token", False, True),
    ("fp32-d64-N1000-full-fused", "fp32", 64, 1000, False, "fused", True, "scalar", False, True),
    ("fp32-d128-N77-causal-linear", "fp32", 128, 77, True, "linear", False, "head", False, True),
    ("fp16-d128-N197-full-split", "fp16", 128, 197, False, "linear", True, "scalar", True, True),
    ("bf16-d128-N77-causal-split", "bf16", 128, 77, True, "fused", False, "head", True, True),
    ("infer-fp16-d64-N197-full", "fp16", 64, 197, False, "linear", True, "scalar", False, False),
    ("infer-bf16-d128-N1000-causal", "bf16", 128, 1000, True, "linear", False, "head", False, False),
]
# racecheck: one call per kernel form (one-pass and SPLIT dK/dV, causal and not, fp32's own rows), short sequences
SMALL = ["fp16-d64-N77-causal-fused", "fp16-d128-N197-full-split", "fp32-d128-N77-causal-linear",
         "bf16-d128-N77-causal-split"]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DRY_N = {1: 1, 77: 17, 197: 33, 1000: 65}  # tail blocks, one row, several blocks: the same cases, smaller
DRY_D = {64: 16, 128: 32}
B, H = 2, 2  # batch and diff-heads (B = H = 1 in a dry run)


def _inputs(dtype, d, N, layout, device, gen, B, H):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if layout == "contiguous":
        q, k, v = rnd(B, 2 * H, N, d), rnd(B, 2 * H, N, d), rnd(B, H, N, 2 * d)
    elif layout == "linear":  # views of (B, N, 2H·d) projections, transposed: what a model feeds in
        q, k = (rnd(B, N, 2 * H * d).view(B, N, 2 * H, d).transpose(1, 2) for _ in range(2))
        v = rnd(B, N, 2 * H * d).view(B, N, H, 2 * d).transpose(1, 2)
    else:  # "fused": slices of one (B, N, 3, ·) buffer, non-dense strides
        qkv = rnd(B, N, 3, 2 * H * d)
        q, k = (qkv[:, :, i].view(B, N, 2 * H, d).transpose(1, 2) for i in range(2))
        v = qkv[:, :, 2].view(B, N, H, 2 * d).transpose(1, 2)
    return q, k, v


def _lam(kind, N, device, gen, B, H):
    if kind == "scalar":
        return torch.tensor(0.8, device=device)
    if kind == "head":
        return torch.linspace(0.5, 0.9, H, device=device)
    return 0.5 + 0.4 * torch.rand(B, H, N, generator=gen).to(device)


def run_call(spec, device, dry, gen):
    """One forward (and backward): every output and gradient is read back (a sum) and must be finite."""
    from kernels import configs, diff_attn

    name, dt, d, N, causal, layout, norm, lam_kind, split, backward = spec
    dtype, batch, heads = DTYPES[dt], B, H
    if dry:
        d, N, batch, heads = DRY_D[d], DRY_N[N], 1, 1
        dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    q, k, v = _inputs(dtype, d, N, layout, device, gen, batch, heads)
    lam = _lam(lam_kind, N, device, gen, batch, heads)
    w = (1 + 0.1 * torch.randn(2 * d, generator=gen)).to(device) if norm else None
    leaves = [t for t in (q, k, v, lam, w) if t is not None]
    if backward:
        for t in leaves:
            t.requires_grad_(True)
    forced = {}
    if split:  # the two-pass dK/dV form (a Hopper row for d = 128; forced here on any card)
        forced["dkdv"] = next(r for r in configs.ROWS["dkdv"] if r.split).config()
    with configs.force_configs(**forced), torch.set_grad_enabled(backward):
        out = diff_attn(q, k, v, lam, causal=causal, norm_weight=w, out_scale=0.7)
        results = [out]
        if backward:
            dout = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
            results += torch.autograd.grad(out, leaves, dout)
    sums = torch.stack([r.detach().double().sum() for r in results])  # reads every element
    if not torch.isfinite(sums).all():
        raise RuntimeError(f"{name}: non-finite output or gradient (sums {sums.tolist()})")
    return len(results)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", choices=("full", "small"), default="full")
    parser.add_argument("--dry-run", action="store_true", help="no CUDA: Triton's interpreter, tiny sizes")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported (by kernels.diff_attn's first call)
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("sanitize_calls.py: no CUDA device; use --dry-run")
        device = "cuda"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
    specs = CALLS if args.calls == "full" else [c for c in CALLS if c[0] in SMALL]
    gen = torch.Generator().manual_seed(0)
    # Deterministic mode: fixed configs, and kernel buffers allocated without PyTorch's NaN fill (see above).
    torch.use_deterministic_algorithms(True, warn_only=True)
    start = time.perf_counter()
    for spec in specs:
        t0 = time.perf_counter()
        n = run_call(spec, device, args.dry_run, gen)
        if device == "cuda":
            torch.cuda.synchronize()
        print(f"ok {spec[0]:40} {n} tensors read back  {time.perf_counter() - t0:6.2f} s", flush=True)
    print(f"sanitize_calls: {len(specs)} calls ({args.calls}{', dry run' if args.dry_run else ''}) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
