"""Compile the Triton kernels a benchmark plan will autotune, in parallel, before the benchmark runs.

    python -m benchmarks.warm_cache [--jobs 8] [--smoke]

Autotuning compiles every candidate config of every kernel the first time a key is seen, one after the other: at
the long-sequence shapes that is tens of seconds per shape (forward, training forward, dK/dV, dQ and the one-launch
backward forms), which the first device run spent inside the benchmark's time limit. Triton keeps compiled kernels
in its on-disk cache, shared by processes, so this script runs each (shape, backward form) of
`bench_diff_attn.DEVICE_CHECK` once — forward without gradient, then forward and backward — in `--jobs` worker
processes side by side; the benchmark then finds the binaries on disk and autotuning only times them. The choices
made here are not kept (timing on a shared GPU would be noisy): the benchmark tunes again.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time


def tasks(smoke: bool) -> list:
    """[(label, B, H, N, d, causal, dtype name, backward form)]: the triton cases of the device plan."""
    from .bench_diff_attn import DEVICE_CHECK, SMOKE_SHAPES

    if smoke:
        return [(*s, "fp32", "separate") for s in SMOKE_SHAPES[:1]]
    out = []
    for shape, modes, providers in DEVICE_CHECK:
        forms = ["separate"] + [p.removeprefix("triton-bwd-") for p in providers if p.startswith("triton-bwd-")]
        out += [(*shape, "bf16", form) for form in forms]
    return out


def _warm(task) -> str:
    label, B, H, N, d, causal, dtype_name, form = task
    t0 = time.monotonic()
    try:
        os.environ["DIFF_ATTN_BWD"] = form
        import torch

        from . import common
        from kernels import diff_attn

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        q, k, v, lam = common.qkv_inputs(B, H, N, d, dtype, device, grad=True)
        with torch.no_grad():
            diff_attn(q, k, v, lam, causal=causal)
        out = diff_attn(q, k, v, lam, causal=causal)
        out.backward(torch.randn_like(out))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return f"warm {label} {form}: {time.monotonic() - t0:.1f} s"
    except Exception as e:  # one case that fails must not stop the others; the benchmark reports it properly
        from .common import reason

        return f"warm {label} {form}: FAILED after {time.monotonic() - t0:.1f} s: {reason(e)}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--smoke", action="store_true", help="one tiny fp32 case on CPU (plumbing only)")
    args = p.parse_args(argv)
    from . import common

    on_cpu = common.setup_interpreter()
    if on_cpu and not args.smoke:
        p.error("warming the kernel cache needs a CUDA GPU; use --smoke on CPU")
    todo = tasks(args.smoke)
    t0 = time.monotonic()
    # spawn: each worker starts its own CUDA context (fork after CUDA initialisation is not allowed)
    with mp.get_context("spawn").Pool(max(1, min(args.jobs, len(todo)))) as pool:
        for line in pool.imap_unordered(_warm, todo):
            print(line, flush=True)
    print(f"warmed {len(todo)} cases in {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
