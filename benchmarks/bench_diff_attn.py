"""Op-level benchmark: the fused kernel vs eager PyTorch, two/four SDPA calls and torch.compile.

    python -m benchmarks.bench_diff_attn                       # full suite (GPU)
    python -m benchmarks.bench_diff_attn --shapes diffclip --modes fwd --dtypes bf16 --json out.json --plot out.png
    python -m benchmarks.bench_diff_attn --smoke --json /tmp/smoke.json   # tiny shapes, runs on CPU

Every provider's output (and gradients, for bwd modes) is checked against the fp32 reference before it is timed;
a provider that fails the check or cannot run here is reported with the reason instead of a time.
Times are `triton.testing.do_bench` medians on CUDA. FLOPs: forward 12·N²·d, backward 20·N²·d per diff-head
(halved when causal; see `common.flops_bwd`).
"""

from __future__ import annotations

import argparse
import sys

import torch

from . import common

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDER_NAMES = ("triton", "eager", "sdpa2", "sdpa4", "compile")


def shape_list(which: str, batches=(1, 32, 256, 1024)):
    """(label, B, H, N, d, causal) rows."""
    rows = []
    if which in ("diffclip", "all"):
        rows += [("vision", b, 6, 197, 64, False) for b in batches]
        rows += [("text", b, 4, 77, 64, True) for b in batches]
    if which in ("sweep", "all"):
        for d, H in ((64, 16), (128, 8)):
            n = 256
            while n <= 16384:
                rows.append((f"sweep-d{d}", max(1, 16384 // n), H, n, d, False))
                n *= 2
    return rows


# benchmarks/device_check.sh: the DiffCLIP shapes at B=256 and one long sequence.
DEVICE_CHECK_SHAPES = [("vision", 256, 6, 197, 64, False), ("text", 256, 4, 77, 64, True),
                       ("long", 4, 16, 4096, 64, False)]
SMOKE_SHAPES = [("smoke-vision", 2, 2, 33, 16, False), ("smoke-text", 2, 2, 17, 16, True)]


_REFERENCE_CACHE: dict = {}


def _check(fn, q, k, v, lam, causal, mode):
    """Relative L2 error of the output (and of dq, dk, dv for bwd modes) against the fp32 reference, which is
    computed once per case (inputs are deterministic) and shared by all providers."""
    from kernels import diff_attn_reference

    def run(f, q_, k_, v_):
        out = f(q_, k_, v_, lam, causal=causal)
        if mode == "fwd":
            return [out]
        return [out, *torch.autograd.grad(out, (q_, k_, v_), torch.ones_like(out) / out.numel() ** 0.5)]

    ours = run(fn, q, k, v)
    key = (tuple(q.shape), q.dtype, str(q.device), causal, mode == "fwd")
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE.clear()  # one case at a time: keep device memory for the providers
        f32 = [t.detach().float().requires_grad_(mode != "fwd") for t in (q, k, v)]
        _REFERENCE_CACHE[key] = [t.detach() for t in run(diff_attn_reference, *f32)]
    ref = _REFERENCE_CACHE[key]
    return max(((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(ours, ref))


def _graph_ms(fn, q, k, v, lam, causal, mode):
    """(ms, None) of the same step replayed from CUDA graphs (`torch.cuda.make_graphed_callables`: forward, and
    backward for fwd+bwd), i.e. the kernels without Python and launch costs; (None, reason) when capture fails.
    Next to `ms` and `host_ms` it says what removing the host's share would give."""
    try:
        graphed = torch.cuda.make_graphed_callables(lambda q_, k_, v_: fn(q_, k_, v_, lam, causal=causal), (q, k, v))
        if mode == "fwd":
            def step():
                return graphed(q, k, v)
            grads = None
        else:
            dout = torch.randn_like(graphed(q, k, v))

            def step():
                graphed(q, k, v).backward(dout)
            grads = [q, k, v]
        return common.bench_ms(step, grad_to_none=grads), None
    except Exception as e:  # capture is an extra: its failure is recorded, the row keeps its other numbers
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def run_case(provider, label, B, H, N, d, causal, dtype_name, mode, device):
    from .providers import PROVIDERS, skip_reason

    dtype = DTYPES[dtype_name]
    row = dict(provider=provider, shape=label, B=B, H=H, N=N, d=d, causal=causal, dtype=dtype_name, mode=mode,
               ms=None, host_ms=None, tflops=None, peak_mb=None, rel_err=None, skipped=None)
    reason = skip_reason(provider, device)
    if reason is None and provider == "eager" and B * 2 * H * N * N * 4 > 16 * 2**30:
        reason = "eager would materialise > 16 GiB of attention maps"
    if reason:
        row["skipped"] = reason
        return row
    fn = PROVIDERS[provider]
    grad = mode != "fwd"
    try:
        q, k, v, lam = common.qkv_inputs(B, H, N, d, dtype, device, grad)
        row["rel_err"] = _check(fn, q, k, v, lam, causal, mode)
        limit = 1e-4 if dtype == torch.float32 else 2e-2
        if not row["rel_err"] <= limit:
            row["skipped"] = f"output check failed: rel err {row['rel_err']:.2e} > {limit:.0e}"
            return row
        if mode == "fwd":
            def step():
                return fn(q, k, v, lam, causal=causal)
        else:
            out = fn(q, k, v, lam, causal=causal)
            dout = torch.randn_like(out)
            if mode == "bwd":
                def step():
                    out.backward(dout, retain_graph=True)
            else:
                def step():
                    fn(q, k, v, lam, causal=causal).backward(dout)
        grads = [q, k, v] if grad else None
        row["ms"] = common.bench_ms(step, grad_to_none=grads)
        row["tflops"] = common.flops(mode, B, H, N, d, causal) / (row["ms"] * 1e-3) / 1e12
        row["peak_mb"] = common.peak_memory_mb(step)
        # The host's share: a case whose ms is close to host_ms is launch-bound (small N), not kernel-bound.
        row["host_ms"] = common.host_ms(step)
        if provider == "triton":  # the configs autotuning chose for this case (latest launch of each kernel)
            from kernels import configs

            row["configs"] = {k: configs.describe(configs.LAST_CONFIG[k])
                              for k in (("fwd",) if mode == "fwd" else configs.KERNELS)}
            if device.type == "cuda" and mode != "bwd":
                row["graph_ms"], row["graph_skipped"] = _graph_ms(fn, q, k, v, lam, causal, mode)
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as e:  # a provider that breaks must not end the whole benchmark: record why
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row


def add_speedups(rows):
    """speedup_vs_eager / speedup_vs_sdpa2 = their time / this time, within the same case."""
    key = lambda r: (r["shape"], r["B"], r["H"], r["N"], r["d"], r["causal"], r["dtype"], r["mode"])  # noqa: E731
    by_case = {}
    for r in rows:
        by_case.setdefault(key(r), {})[r["provider"]] = r
    for r in rows:
        case = by_case[key(r)]
        for base in ("eager", "sdpa2"):
            b = case.get(base)
            ok = r["ms"] and b is not None and b["ms"]
            r[f"speedup_vs_{base}"] = b["ms"] / r["ms"] if ok else None
    return rows


# The issues' performance targets (H100, bf16), checked on every run that has the rows they need.
TARGETS = [
    # (name, shape label, mode, metric, baseline provider or None, threshold)
    ("vision fwd >= 1.5x sdpa2", "vision", "fwd", "speedup", "sdpa2", 1.5),
    ("vision fwd >= 1.3x sdpa4", "vision", "fwd", "speedup", "sdpa4", 1.3),
    ("vision fwd >= 6x eager", "vision", "fwd", "speedup", "eager", 6.0),
    ("text fwd >= 1.5x sdpa2", "text", "fwd", "speedup", "sdpa2", 1.5),
    ("N=4096 fwd >= 350 TFLOP/s", "long", "fwd", "tflops", None, 350.0),
    ("N=4096 fwd+bwd >= 1.3x sdpa2", "long", "fwd+bwd", "speedup", "sdpa2", 1.3),
]


def evaluate_targets(rows):
    """[{target, value, met}] for each target whose rows (bf16, largest batch of that shape) are present."""
    out = []
    for name, shape, mode, metric, base, threshold in TARGETS:
        cand = [r for r in rows if r["shape"] == shape and r["mode"] == mode and r["dtype"] == "bf16"]
        if not cand:
            continue
        batch = max(r["B"] for r in cand)
        case = {r["provider"]: r for r in cand if r["B"] == batch}
        ours = case.get("triton")
        if not ours or not ours["ms"]:
            continue
        if metric == "tflops":
            value = ours["tflops"]
        else:
            b = case.get(base)
            if not b or not b["ms"]:
                continue
            value = b["ms"] / ours["ms"]
        out.append({"target": f"{name} (B={batch})", "value": round(value, 3), "met": value >= threshold})
    return out


def plot(rows, path, device=""):
    """One panel per (shape, dtype, mode): TFLOP/s against N per provider for the sweeps, bars where a shape has a
    single N (the DiffCLIP shapes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["shape"], r["dtype"], r["mode"]) for r in rows if r["ms"]})
    if not groups:
        return
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, (shape, dtype, mode) in zip(axes.flat, groups):
        sel = [r for r in rows if (r["shape"], r["dtype"], r["mode"]) == (shape, dtype, mode) and r["tflops"]]
        ns = sorted({r["N"] for r in sel})
        if len(ns) == 1:
            provs = [p for p in PROVIDER_NAMES if any(r["provider"] == p for r in sel)]
            vals = [max(r["tflops"] for r in sel if r["provider"] == p) for p in provs]
            ax.bar(provs, vals, color=[f"C{PROVIDER_NAMES.index(p)}" for p in provs])
            b = sel[0]
            ax.set_title(f"{shape} B={b['B']} H={b['H']} N={b['N']} d={b['d']}\n{dtype} {mode}", fontsize=9)
        else:
            for prov in PROVIDER_NAMES:
                pts = sorted((r["N"], r["tflops"]) for r in sel if r["provider"] == prov)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov, color=f"C{PROVIDER_NAMES.index(prov)}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N")
            ax.legend(fontsize=7)
            ax.set_title(f"{shape} {dtype} {mode}", fontsize=9)
        ax.set_ylabel("TFLOP/s")
    fig.suptitle(f"diff_attn on {device}" if device else "diff_attn", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", choices=["diffclip", "sweep", "all", "device-check"])
    p.add_argument("--batches", default="1,32,256,1024", help="batches of the DiffCLIP shapes")
    p.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--providers", default=",".join(PROVIDER_NAMES))
    p.add_argument("--max-n", type=int, default=16384, help="largest N of the sweeps")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, runs on CPU (Triton interpreter)")
    p.add_argument("--sweep", choices=["full", "reduced"], help="also time every default config of each kernel at "
                   "a few shapes (benchmarks/sweep.py; reduced: N=4096 at d=64 and 128, then vision), first --dtypes entry")
    p.add_argument("--sweep-budget-s", type=float, help="stop starting sweep rows after this many seconds (each "
                   "new config compiles first); the rows not run are recorded as skipped")
    p.add_argument("--json", help="write results here")
    p.add_argument("--plot", help="write a PNG plot here")
    args = p.parse_args(argv)

    on_cpu = common.setup_interpreter()
    device = torch.device("cpu" if on_cpu else "cuda")
    providers = [x for x in args.providers.split(",") if x]
    for x in providers:
        if x not in PROVIDER_NAMES:
            p.error(f"unknown provider {x!r}; choose from {', '.join(PROVIDER_NAMES)}")
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        p.error(f"modes must be among {', '.join(MODES)}")
    if args.smoke:
        shapes, dtypes = SMOKE_SHAPES, ["fp32"]
    else:
        if on_cpu:
            p.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
        batches = tuple(int(b) for b in args.batches.split(","))
        shapes = DEVICE_CHECK_SHAPES if args.shapes == "device-check" else shape_list(args.shapes, batches)
        shapes = [s for s in shapes if s[3] <= args.max_n]
        dtypes = [t for t in args.dtypes.split(",") if t]
    env = common.environment()
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}", flush=True)
    rows = []
    for label, B, H, N, d, causal in shapes:
        for dtype in dtypes:
            for mode in modes:
                for prov in providers:
                    r = run_case(prov, label, B, H, N, d, causal, dtype, mode, device)
                    rows.append(r)
                    status = f"{r['ms']:.3f} ms" if r["ms"] else f"skipped: {r['skipped']}"
                    print(f"{label:13} B={B:<5} N={N:<6} d={d:<4} {dtype} {mode:8} {prov:8} {status}", flush=True)
    add_speedups(rows)
    print()
    common.print_table(rows, [("shape", "shape", "13"), ("B", "B", "d"), ("N", "N", "d"), ("d", "d", "d"),
                              ("dtype", "dtype", "5"), ("mode", "mode", "8"), ("provider", "provider", "8"),
                              ("ms", "ms", ".3f"), ("host_ms", "host ms", ".3f"), ("graph_ms", "graph ms", ".3f"),
                              ("tflops", "TFLOP/s", ".1f"), ("peak_mb", "peak MB", ".0f"),
                              ("speedup_vs_eager", "x eager", ".2f"), ("speedup_vs_sdpa2", "x sdpa2", ".2f")])
    targets = evaluate_targets(rows)
    for t in targets:
        print(f"target {t['target']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}")
    extra = {"benchmark": "diff_attn", "smoke": args.smoke, "targets": targets, "sweep": [],
             "flops": {"fwd": "12*N^2*d per diff-head", "bwd": "20*N^2*d per diff-head", "causal": "halved"}}
    # Written before the sweep too: a sweep cut short by a time limit must not take the main table with it.
    if args.json:
        common.write_json(args.json, env, rows, extra)
    if args.plot:
        plot(rows, args.plot, env["device"])
    if args.sweep:
        from . import sweep

        sweep_shapes = sweep.SMOKE if args.smoke else (sweep.FULL if args.sweep == "full" else sweep.REDUCED)
        extra["sweep"] = sweep.run_sweep(sweep_shapes, dtypes[0], device, budget_s=args.sweep_budget_s)
        for shape, kernels_ in sweep.winners(extra["sweep"]).items():
            print(f"sweep winner {shape}: " + "; ".join(f"{k} {c}" for k, c in kernels_.items()))
        if args.json:
            common.write_json(args.json, env, rows, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
