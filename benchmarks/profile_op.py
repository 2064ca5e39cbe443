"""Where the time of one forward+backward goes: torch.profiler over a few steps of a provider at a DiffCLIP shape,
GPU time per kernel and host time per op, per step. It answers what `bench_ms` cannot: which of our kernels
(forward, backward preprocess, dK/dV, dQ) dominates, and whether a small-N case is bound by launches.

    python -m benchmarks.profile_op --shapes text,vision --providers triton,sdpa2 --json prof.json

Needs CUDA; `--smoke` runs tiny fp32 shapes on CPU through the interpreter (plumbing only: no GPU timeline).
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import common

SHAPES = {  # label -> (B, H, N, d, causal): the DiffCLIP encoders at batch 256
    "vision": (256, 6, 197, 64, False),
    "text": (256, 4, 77, 64, True),
    "long": (4, 16, 4096, 64, False),
}
SMOKE_SHAPE = ("smoke", (1, 1, 40, 16, True))


def summarize(events, steps: int, top: int = 10) -> dict:
    """GPU time per step from the device kernel events only (`common.device_kernel_events`: torch's own rule; the
    device time torch attaches to CPU ops is those same kernels, and user annotations are not kernels), the top
    kernels, and the top host ops by self CPU time (as listed by the profiler, overhead included)."""
    gpu = sorted(common.device_kernel_events(events), key=common.device_us, reverse=True)
    on_gpu = {id(e) for e in gpu}
    host = sorted((e for e in events if id(e) not in on_gpu), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "gpu_us_per_step": sum(common.device_us(e) for e in gpu) / steps,
        "top_gpu": [{"name": e.key[:90], "us_per_step": common.device_us(e) / steps,
                     "calls_per_step": e.count / steps} for e in gpu[:top]],
        "top_host": [{"name": e.key[:90], "us_per_step": e.self_cpu_time_total / steps,
                      "calls_per_step": e.count / steps} for e in host[:top]],
    }


def profile_case(provider: str, label: str, shape: tuple, dtype: torch.dtype, device: torch.device, steps: int = 5,
                 top: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from .providers import fresh

    B, H, N, d, causal = shape
    fn = fresh(provider)
    q, k, v, lam = common.qkv_inputs(B, H, N, d, dtype, device, grad=True)

    def step():
        for t in (q, k, v):  # no gradient accumulation kernels in the profile
            t.grad = None
        fn(q, k, v, lam, causal=causal).backward(dout)

    dout = torch.randn_like(fn(q, k, v, lam, causal=causal))
    for _ in range(3):  # compile, autotune, warm caches outside the profile
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    result = summarize(prof.key_averages(), steps, top)
    # Host time from host_ms (no profiler attached): the profiler's own CPU events include its overhead.
    host = common.host_ms(step)
    result = {"provider": provider, "shape": label, "B": B, "H": H, "N": N, "d": d, "causal": causal,
              "dtype": str(dtype).removeprefix("torch."), "steps": steps,
              "host_us_per_step": host * 1e3 if host is not None else None, **result}
    host_txt = f"{result['host_us_per_step']:.0f} us/step" if result["host_us_per_step"] is not None else "n/a"
    print(f"== {provider} {label} B={B} N={N} fwd+bwd: GPU {result['gpu_us_per_step']:.0f} us/step, "
          f"host {host_txt}")
    for title, rows in (("GPU", result["top_gpu"]), ("host", result["top_host"])):
        for r in rows:
            print(f"   {title:4} {r['us_per_step']:9.1f} us  x{r['calls_per_step']:<5g} {r['name']}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="text,vision", help=f"among {', '.join(SHAPES)}")
    p.add_argument("--providers", default="triton,sdpa2")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="one tiny fp32 shape on CPU (Triton interpreter)")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    on_cpu = common.setup_interpreter()
    if on_cpu and not args.smoke:
        p.error("profiling needs a CUDA GPU; use --smoke on CPU")
    from .providers import PROVIDERS

    names = [s for s in args.shapes.split(",") if s]
    providers = [x for x in args.providers.split(",") if x]
    for s in names:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    shapes = [SMOKE_SHAPE] if args.smoke else [(s, SHAPES[s]) for s in names]
    dtype = torch.float32 if args.smoke else torch.bfloat16
    device = torch.device("cpu" if on_cpu else "cuda")
    for x in providers:
        if x not in PROVIDERS:
            p.error(f"unknown provider {x!r}; choose from {', '.join(PROVIDERS)}")
    env = common.environment()
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}", flush=True)
    results = []
    try:
        for label, shape in shapes:
            for prov in providers:
                try:
                    results.append(profile_case(prov, label, shape, dtype, device, steps=args.steps))
                except Exception as e:  # one failing case must not lose the others
                    print(f"== {prov} {label}: {common.reason(e)}")
                    results.append({"provider": prov, "shape": label, "skipped": f"{type(e).__name__}: {e}"[:300]})
                if args.json:  # after every case: a run cut short keeps the cases it finished
                    common.write_json(args.json, env, results, {"benchmark": "profile_op"})
    except KeyboardInterrupt:
        print("!! interrupted: the JSON has the cases finished so far", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
