"""Config sweep: every default config of each kernel (kernels/configs.py, pruned for this card) timed at a few
shapes, so that one short GPU run tells which rows win and which never do.

Each row forces one kernel's config (`kernels.configs.force_configs`) and keeps the other kernels at their fixed
config (the first fitting row), so differences within a kernel's rows come from that kernel alone:
- fwd:  the inference forward (no saved state);
- dkdv, dq: one backward (forward done once outside the timing).
"""

from __future__ import annotations

import time

import torch

from . import common

# (label, B, H, N, d, causal): DiffCLIP vision and text, and N = 4096 at d = 64 and 128.
FULL = [("vision", 256, 6, 197, 64, False), ("text", 256, 4, 77, 64, True),
        ("long-d64", 4, 16, 4096, 64, False), ("long-d128", 4, 8, 4096, 128, False)]
# Most informative first (device_check runs it under a time budget): N = 4096 at d = 64 (the 350 TFLOP/s target;
# the first H200 run never reached it), then d = 128 (the SPLIT dK/dV row), then the vision shape (measured once).
REDUCED = [("long-d64", 4, 16, 4096, 64, False), ("long-d128", 4, 8, 4096, 128, False),
           ("vision", 256, 6, 197, 64, False)]
SMOKE = [("smoke", 1, 1, 40, 16, True)]


def _time_config(kernel, cfg, fixed, shape, dtype, device):
    from kernels import configs, diff_attn

    label, B, H, N, d, causal = shape
    q, k, v, lam = common.qkv_inputs(B, H, N, d, dtype, device)
    with configs.force_configs(**dict(fixed, **{kernel: cfg})):
        if kernel == "fwd":
            def step():
                with torch.no_grad():
                    return diff_attn(q, k, v, lam, causal=causal)
            grads = None
        else:
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = diff_attn(q, k, v, lam, causal=causal)
            dout = torch.randn_like(out)

            def step():
                out.backward(dout, retain_graph=True)
            grads = [q, k, v]
        return common.bench_ms(step, grad_to_none=grads)


def run_sweep(shapes, dtype_name, device, budget_s=None):
    """One row per (shape, kernel, fitting config): ms, or the reason it failed. With `budget_s`, rows not started
    within that many seconds are recorded as skipped (a bounded run on lent device time)."""
    from kernels import configs

    deadline = None if budget_s is None else time.monotonic() + budget_s

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    sm = configs.device_sm(device)
    rows = []
    for shape in shapes:
        label, B, H, N, d, causal = shape
        problem = configs.Problem(d, dtype.itemsize, causal, N, sm)
        fixed = {kern: configs.fixed_config(kern, problem) for kern in configs.KERNELS}
        if device.type == "cpu":  # the interpreter: real rows run, but keep the untimed kernels cheap
            fixed = dict(configs.INTERPRET)
        for kernel in configs.KERNELS:
            for r in configs.fitting_rows(kernel, problem):
                row = dict(sweep=True, shape=label, B=B, H=H, N=N, d=d, causal=causal, dtype=dtype_name,
                           kernel=kernel, config=configs.describe(r.config()), ms=None, skipped=None)
                try:
                    if deadline is not None and time.monotonic() > deadline:
                        row["skipped"] = f"sweep time budget ({budget_s:g} s) spent"
                    else:
                        row["ms"] = _time_config(kernel, r.config(), fixed, shape, dtype, device)
                except torch.cuda.OutOfMemoryError:
                    row["skipped"] = "out of memory"
                    torch.cuda.empty_cache()
                except Exception as e:  # a config that fails must not end the sweep: record why
                    row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                rows.append(row)
                status = f"{row['ms']:.3f} ms" if row["ms"] else f"skipped: {row['skipped']}"
                print(f"sweep {label:10} {dtype_name} {kernel:5} {row['config']:34} {status}", flush=True)
    return rows


def winners(rows):
    """{shape: {kernel: fastest config}} of a sweep."""
    best = {}
    for r in rows:
        if r["ms"] is None:
            continue
        cur = best.setdefault(r["shape"], {}).get(r["kernel"])
        if cur is None or r["ms"] < cur[1]:
            best[r["shape"]][r["kernel"]] = (r["config"], r["ms"])
    return {s: {k: c for k, (c, _) in ks.items()} for s, ks in best.items()}
