"""Where a DiffCLIP training step's time goes, per attention backend, beside plain CLIP (issue 19).

    python -m benchmarks.profile_model --backends sdpa,triton,plain-clip --batch 128 --json prof_model.json
    python -m benchmarks.profile_model --smoke --json /tmp/p.json      # tiny model on CPU: plumbing only

For each backend, a few training steps (forward, CLIP loss, backward; ViT-B/16, bf16, random weights) under
torch.profiler: wall time per step, GPU busy time per step (the union of kernel intervals: idle gaps between
kernels are host overhead), GPU time by category (matmul, attention, norms, elementwise/other, copies), kernel
launches per step, and the top kernels. On CPU there is no device timeline: only wall time and the host's ops.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from . import common

# Kernel name -> category (first match wins). Triton kernels of ours: _diff_attn_fwd_kernel, _bwd_*.
CATEGORIES = [
    ("attention", re.compile(r"flash|fmha|attention|attn|cudnn|_bwd_|sdpa|softmax", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|cublas|matmul|sm\d\d_|ampere_|hopper_|_mm_|wgmma", re.I)),
    ("norm", re.compile(r"norm", re.I)),
    ("copy", re.compile(r"copy|memcpy|memset|cat|fill", re.I)),
]


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return "elementwise/other"


def busy_us(events) -> float:
    """Length of the union of the events' [start, end] intervals, µs."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, cur_start, cur_end = 0.0, None, None
    for s, e in spans:
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarize(events, steps: int, wall_ms: float, top: int = 15) -> dict:
    kernels = common.device_kernel_events(events)
    by_cat, by_name = {}, {}
    for e in kernels:
        us = common.device_us(e)
        by_cat[category(e.name)] = by_cat.get(category(e.name), 0.0) + us
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    gpu_ms = sum(by_cat.values()) / 1e3 / steps
    busy_ms = busy_us(kernels) / 1e3 / steps if kernels else 0.0
    return {"wall_ms_per_step": wall_ms, "gpu_kernel_ms_per_step": gpu_ms, "gpu_busy_ms_per_step": busy_ms,
            "gpu_idle_fraction": (1 - busy_ms / wall_ms) if kernels and wall_ms else None,
            "launches_per_step": len(kernels) / steps,
            "ms_per_step_by_category": {k: v / 1e3 / steps for k, v in sorted(by_cat.items())},
            "top_kernels": [{"name": n[:100], "ms_per_step": us / 1e3 / steps}
                            for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]]}


def profile_backend(name, base, plain, config, batch, device, dtype, steps, warmup=3):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .bench_model import contrastive_loss, make_inputs

    model = plain if name == "plain-clip" else base.set_attn_backend(name)
    model.train()
    image, text = make_inputs(config, batch, device, dtype)

    def step():
        model.zero_grad(set_to_none=True)
        contrastive_loss(model(image, text)).backward()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):  # autotune, allocator and caches warm before the profile
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    result = {"backend": name, "batch": batch, "steps": steps, **summarize(prof.events(), steps, wall_ms)}
    model.eval()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="sdpa,triton,plain-clip")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny model, fp32, CPU (Triton interpreter)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    on_cpu = common.setup_interpreter()
    if on_cpu and not args.smoke:
        p.error("profiling the model needs a CUDA GPU; use --smoke on CPU")
    import torch

    from diffclip import DiffCLIP, DiffCLIPConfig

    from .bench_model import smoke_config
    from .plain_clip import plain_clip

    names = [b for b in args.backends.split(",") if b]
    for b in names:
        if b not in ("eager", "sdpa", "triton", "plain-clip"):
            p.error(f"unknown backend {b!r}; choose from eager, sdpa, triton, plain-clip")
    device = torch.device("cpu" if on_cpu else "cuda")
    config = smoke_config() if args.smoke else DiffCLIPConfig.vit_b16()
    dtype = torch.float32 if args.smoke else torch.bfloat16
    batch = 2 if args.smoke else args.batch
    env = common.environment()
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}", flush=True)
    torch.manual_seed(0)
    base = DiffCLIP(config, attn_backend="eager").to(device, dtype)
    plain = plain_clip(config).to(device, dtype)
    rows = []
    try:
        for name in names:
            try:
                r = profile_backend(name, base, plain, config, batch, device, dtype, 1 if args.smoke else args.steps,
                                    warmup=1 if args.smoke else 3)
            except Exception as e:  # one failing backend must not lose the others
                r = {"backend": name, "skipped": common.reason(e)}
            rows.append(r)
            if "skipped" in r:
                print(f"== {name}: skipped: {r['skipped']}", flush=True)
            else:
                cats = ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_step_by_category"].items())
                print(f"== {name} train step B={batch}: wall {r['wall_ms_per_step']:.2f} ms, GPU busy "
                      f"{r['gpu_busy_ms_per_step']:.2f} ms, {r['launches_per_step']:.0f} launches; by category (ms): "
                      f"{cats}", flush=True)
            if args.json:
                common.write_json(args.json, env, rows, {"benchmark": "profile_model", "dtype": str(dtype)})
    except KeyboardInterrupt:
        print("!! interrupted: the JSON has the backends finished so far", flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
