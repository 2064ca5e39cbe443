"""Config sweep: every default config of each kernel (kernels/configs.py, pruned for this card) timed at a few
shapes, so that one short GPU run tells which rows win and which never do.

Each row forces one kernel's config (`kernels.configs.force_configs`) and times **that kernel alone**: the device
time of its launches, read from the profiler (`common.kernel_ms`), so the other kernels of the step (the backward's
preprocess and its other main kernel, held at their fixed configs: the measured winners where there are some, see
`kernels.configs.fixed_config`) add nothing. (The first H200 run timed the whole
backward, so every dK/dV row carried the dQ kernel's fixed-row time and vice versa: the "~1.19 ms floor" of that
sweep was the partner kernel, not host time.) Kernels:
- fwd:       the inference forward (no saved state);
- fwd-train: the training forward (SAVE_FOR_BWD: also writes the log-sum-exps and O2 the backward reads);
- dkdv, dq:  the backward's two main kernels (forward done once outside the timing);
- fused, atomic: the one-launch backward forms' kernel (DIFF_ATTN_BWD; whole-backward comparisons of the forms are
             the op table's `triton-bwd-fused` / `triton-bwd-atomic` providers).
Every row is timed twice, the second pass in reverse order, so drift (clocks, temperature) shows as disagreement
between `ms` and `ms_repeat` instead of as a ranking. Before its first timing each row's output (and gradients, for
backward rows) is checked against the fp32 reference, as the provider table does: a wrong config gets no time. On CPU (the interpreter) the step's wall-clock time stands in:
plumbing only.
"""

from __future__ import annotations

import time

import torch

from . import common

# (label, B, H, N, d, causal): DiffCLIP vision and text, and N = 4096 at d = 64 and 128.
FULL = [("vision", 256, 6, 197, 64, False), ("text", 256, 4, 77, 64, True),
        ("long-d64", 4, 16, 4096, 64, False), ("long-d128", 4, 16, 4096, 128, False)]
# Most informative first (device_check runs it under a time budget): N = 4096 at d = 64 (the forward and backward
# targets), then d = 128 (the SPLIT dK/dV row), then the vision shape.
REDUCED = [("long-d64", 4, 16, 4096, 64, False), ("long-d128", 4, 16, 4096, 128, False),
           ("vision", 256, 6, 197, 64, False)]
# benchmarks/device_sweep.sh (a device call of its own): the long-sequence forms of issues 17 and 18 at N = 4096,
# causal and not, d = 64 and 128, then N = 1024 / 8192 and the DiffCLIP shapes.
LONG = [("long-d64", 4, 16, 4096, 64, False), ("long-d128", 4, 16, 4096, 128, False),
        ("long-d64-causal", 4, 16, 4096, 64, True), ("long-d128-causal", 4, 16, 4096, 128, True),
        ("n1024-d64", 16, 16, 1024, 64, False), ("n8192-d128", 2, 16, 8192, 128, False),
        ("vision", 256, 6, 197, 64, False), ("text", 256, 4, 77, 64, True)]
SETS = {"full": FULL, "reduced": REDUCED, "long": LONG}
SMOKE = [("smoke", 1, 1, 40, 16, True)]
# sweep kernel -> (config list in kernels/configs.py, Triton function name as the profiler shows it)
SWEPT = {"fwd": ("fwd", "_diff_attn_fwd_kernel"), "fwd-train": ("fwd", "_diff_attn_fwd_kernel"),
         "dkdv": ("dkdv", "_bwd_dkdv_kernel"), "dq": ("dq", "_bwd_dq_kernel"),
         # the one-launch backward forms (DIFF_ATTN_BWD=fused / atomic; kernels/bwd_fused.py): their kernel alone,
         # i.e. without the preprocess they share with the separate form and, for atomic, the dQ zero-fill and cast
         "fused": ("fused", "_bwd_fused_kernel"), "atomic": ("atomic", "_bwd_fused_kernel")}
BACKWARD = ("dkdv", "dq", "fused", "atomic")


def _time_config(kernel, cfg, fixed, shape, dtype, device, check=False):
    from kernels import configs, diff_attn

    from .op_case import check as check_output

    label, B, H, N, d, causal = shape
    q, k, v, lam = common.qkv_inputs(B, H, N, d, dtype, device, grad=kernel != "fwd")
    listed, name = SWEPT[kernel]
    form = {"DIFF_ATTN_BWD": kernel} if kernel in ("fused", "atomic") else {}
    with configs.force_configs(**dict(fixed, **{listed: cfg})), common.environ(**form):
        if check:  # no time for a config that computes something else (outputs, and gradients for backward rows)
            err = check_output(diff_attn, q, k, v, lam, causal, "fwd+bwd" if kernel in BACKWARD else "fwd")
            limit = 1e-4 if dtype == torch.float32 else 2e-2
            if not err <= limit:
                raise RuntimeError(f"output check failed: rel err {err:.2e} > {limit:.0e}")
        if kernel == "fwd":
            def step():
                with torch.no_grad():
                    return diff_attn(q, k, v, lam, causal=causal)
            grads = None
        elif kernel == "fwd-train":
            def step():
                return diff_attn(q, k, v, lam, causal=causal)
            grads = None
        else:
            out = diff_attn(q, k, v, lam, causal=causal)
            dout = torch.randn_like(out)

            def step():
                out.backward(dout, retain_graph=True)
            grads = [q, k, v]
        if device.type == "cuda":
            return common.kernel_ms(step, name, grad_to_none=grads)
        return common.bench(step, grad_to_none=grads)


def run_sweep(shapes, dtype_name, device, budget_s=None, out=None, on_row=None):
    """One row per (shape, kernel, fitting config): `ms` (first pass) and `ms_repeat` (second pass, reverse
    order), each with its min/max, or the reason it failed. With `budget_s`, rows not started within that many
    seconds are recorded as skipped (a bounded run on lent device time). Rows are appended to `out` (returned) as
    they finish, and `on_row()` is called after each (the benchmark rewrites its JSON there)."""
    from kernels import configs

    deadline = None if budget_s is None else time.monotonic() + budget_s
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    sm = configs.device_sm(device)
    rows = [] if out is None else out
    todo = []
    for shape in shapes:
        label, B, H, N, d, causal = shape
        problem = configs.Problem(d, dtype.itemsize, causal, N, sm)
        fixed = {kern: configs.fixed_config(kern, problem) for kern in configs.KERNELS}
        if device.type == "cpu":  # the interpreter: real rows run, but keep the untimed kernels cheap
            fixed = dict(configs.INTERPRET)
        for kernel, (listed, _) in SWEPT.items():
            for r in configs.fitting_rows(listed, problem):
                row = dict(sweep=True, shape=label, B=B, H=H, N=N, d=d, causal=causal, dtype=dtype_name,
                           kernel=kernel, config=configs.describe(r.config()), ms=None, ms_repeat=None,
                           skipped=None)
                todo.append((row, r.config(), fixed, shape))
    for pass_no, order in enumerate((todo, todo[::-1])):
        field = "ms" if pass_no == 0 else "ms_repeat"
        for row, cfg, fixed, shape in order:
            if row["skipped"]:
                continue
            try:
                if deadline is not None and time.monotonic() > deadline:
                    if pass_no == 0:
                        row["skipped"] = f"sweep time budget ({budget_s:g} s) spent"
                    continue
                t = _time_config(row["kernel"], cfg, fixed, shape, dtype, device, check=pass_no == 0)
                row.update({field: t["ms"], f"{field}_min": t["ms_min"], f"{field}_max": t["ms_max"],
                            f"{field}_n": t["n"]})
            except torch.cuda.OutOfMemoryError:
                row["skipped"] = "out of memory"
                torch.cuda.empty_cache()
            except Exception as e:  # a config that fails must not end the sweep: record why
                row["skipped"] = common.reason(e)
            if pass_no == 0:
                rows.append(row)
            status = f"{row[field]:.3f} ms" if row.get(field) else f"skipped: {row['skipped']}"
            print(f"sweep {pass_no + 1} {row['shape']:10} {dtype_name} {row['kernel']:9} {row['config']:34} "
                  f"{status}", flush=True)
            if on_row:
                on_row()
    recorded = {id(r) for r in rows}
    rows.extend(row for row, *_ in todo if id(row) not in recorded)  # rows the budget skipped before pass 1
    return rows


def winners(rows):
    """{shape: {kernel: fastest config}} of a sweep, by the mean of the two passes (the first alone when the
    second did not run)."""
    best = {}
    for r in rows:
        if r["ms"] is None:
            continue
        ms = (r["ms"] + r["ms_repeat"]) / 2 if r.get("ms_repeat") else r["ms"]
        cur = best.setdefault(r["shape"], {}).get(r["kernel"])
        if cur is None or ms < cur[1]:
            best[r["shape"]][r["kernel"]] = (r["config"], ms)
    return {s: {k: c for k, (c, _) in ks.items()} for s, ks in best.items()}
