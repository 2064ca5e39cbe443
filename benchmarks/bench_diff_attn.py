"""Op-level benchmark: the fused kernel vs eager PyTorch (ours and the official code's), two/four SDPA calls (plain
and under torch.compile) and torch.compile of the reference (`benchmarks/providers.py` says what each one is).

    python -m benchmarks.bench_diff_attn                       # full suite (GPU)
    python -m benchmarks.bench_diff_attn --shapes device-check --json out.json   # what device_check.sh runs
    python -m benchmarks.bench_diff_attn --shapes diffclip --modes fwd --dtypes bf16 --json out.json --plot out.png
    python -m benchmarks.bench_diff_attn --smoke --json /tmp/smoke.json   # tiny shapes, runs on CPU

Every provider's output (and gradients, against a seeded random upstream gradient, for bwd modes) is checked
against the fp32 reference before it is timed; a provider that fails the check, cannot run here, or (compiled
providers) ran no compiled graph is reported with the reason instead of a time. Times: `triton.testing.do_bench`
on CUDA, median with min and max of at least 10 runs. Every speed-up is reported against the fastest non-triton
provider of the case beside the per-provider ratios (`benchmarks/verdicts.py`). The JSON is rewritten after every
row, so a run cut short keeps what it measured. FLOPs: forward 12·N²·d, backward 20·N²·d per diff-head (halved
when causal; see `common.flops_bwd`).
"""

from __future__ import annotations

import argparse
import sys
import time

from . import common

MODES = ("fwd", "bwd", "fwd+bwd")
VISION = ("vision", 256, 6, 197, 64, False)
TEXT = ("text", 256, 4, 77, 64, True)


def long_shape(d: int, causal: bool, N: int = 4096, tokens: int = 16384, H: int = 16):
    """(label, B, H, N, d, causal) of the long-sequence rows: B·N = 16384 tokens (B = 4 at N = 4096), H = 16."""
    label = f"long-d{d}" if N == 4096 else f"n{N}-d{d}"
    return (label + ("-causal" if causal else ""), max(1, tokens // N), H, N, d, causal)


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


# Who competes where. At the DiffCLIP shapes the combine and the launch count matter, so every baseline runs; at
# long sequences the attention itself dominates and the materialising providers cannot run.
DIFFCLIP_PROVIDERS = ("triton", "triton-bwd-fused", "triton-bwd-atomic", "eager", "eager-official", "sdpa2",
                      "sdpa2-fp32", "sdpa4", "sdpa2-compile", "sdpa4-compile")
LONG_PROVIDERS = ("triton", "triton-bwd-fused", "triton-bwd-atomic", "sdpa2", "sdpa4", "sdpa2-compile")
BACKWARD_ONLY = ("triton-bwd-fused", "triton-bwd-atomic")  # the same forward as triton: no fwd rows
FB = ("fwd", "fwd+bwd")
# benchmarks/device_check.sh, most important first (a time budget cuts the tail): the issues' headline rows
# (N = 4096 d = 64 forward, forward+backward and backward alone), the DiffCLIP shapes, d = 128, causal, then N =
# 1024 and 8192. Entries: (shape, modes, providers).
DEVICE_CHECK = [
    (long_shape(64, False), ("fwd", "fwd+bwd", "bwd"), LONG_PROVIDERS),
    (VISION, FB, DIFFCLIP_PROVIDERS),
    (TEXT, FB, DIFFCLIP_PROVIDERS),
    (long_shape(128, False), FB, LONG_PROVIDERS),
    (long_shape(64, True), FB, LONG_PROVIDERS),
    (long_shape(128, True), FB, LONG_PROVIDERS),
    (long_shape(64, False, N=1024), FB, ("triton", "sdpa2", "sdpa4")),
    (long_shape(64, False, N=8192), FB, ("triton", "sdpa2", "sdpa4")),
]
SMOKE_SHAPES = [("smoke-vision", 2, 2, 33, 16, False), ("smoke-text", 2, 2, 17, 16, True)]


def plan(args, providers_all):
    """[(shape, dtype, mode, provider)] in the order they run."""
    from .op_case import DTYPES

    providers = [x for x in args.providers.split(",") if x] if args.providers else list(providers_all)
    modes = [m for m in args.modes.split(",") if m] if args.modes else list(MODES)
    dtypes = ["fp32"] if args.smoke else [t for t in args.dtypes.split(",") if t]
    for name, allowed in (("provider", providers_all), ("mode", MODES), ("dtype", DTYPES)):
        chosen = {"provider": providers, "mode": modes, "dtype": dtypes}[name]
        bad = [x for x in chosen if x not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad[0]!r}; choose from {', '.join(allowed)}")
    if args.smoke:
        entries = [(s, MODES, providers_all) for s in SMOKE_SHAPES]
    elif args.shapes == "device-check":
        entries = DEVICE_CHECK
    else:
        batches = tuple(int(b) for b in args.batches.split(","))
        entries = [(s, MODES, providers_all) for s in shape_list(args.shapes, batches) if s[3] <= args.max_n]
    return [(shape, dtype, mode, prov) for shape, e_modes, e_provs in entries for dtype in dtypes
            for mode in e_modes if mode in modes for prov in e_provs if prov in providers
            and not (mode == "fwd" and prov in BACKWARD_ONLY)]


def _print_table(rows):
    common.print_table(rows, [("shape", "shape", "16"), ("B", "B", "d"), ("N", "N", "d"), ("d", "d", "d"),
                              ("dtype", "dtype", "5"), ("mode", "mode", "8"), ("provider", "provider", "14"),
                              ("ms", "ms", ".3f"), ("ms_min", "min", ".3f"), ("ms_max", "max", ".3f"),
                              ("host_ms", "host ms", ".3f"), ("graph_ms", "graph ms", ".3f"),
                              ("tflops", "TFLOP/s", ".1f"), ("peak_mb", "peak MB", ".0f"),
                              ("speedup_vs_sdpa2", "x sdpa2", ".2f"), ("best_baseline", "best other", "14"),
                              ("speedup_vs_best", "x best", ".2f")])


def main(argv=None):
    from .providers import PROVIDERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="all", choices=["diffclip", "sweep", "all", "device-check"])
    p.add_argument("--batches", default="1,32,256,1024", help="batches of the DiffCLIP shapes")
    p.add_argument("--modes", help=f"among {', '.join(MODES)} (default: all the plan has)")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--providers", help=f"among {', '.join(PROVIDERS)} (default: all the plan has)")
    p.add_argument("--max-n", type=int, default=16384, help="largest N of the sweeps")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, fp32, runs on CPU (Triton interpreter)")
    p.add_argument("--budget-s", type=float, help="stop starting rows after this many seconds; the rows not run "
                   "are recorded as skipped (a bounded run on lent device time)")
    p.add_argument("--sweep", choices=["full", "reduced", "long"], help="also time every default config of each "
                   "kernel at a few shapes (benchmarks/sweep.py; reduced: N=4096 at d=64 and 128, then vision; long: "
                   "N=4096 causal or not, N=1024/8192, the DiffCLIP shapes), first --dtypes entry")
    p.add_argument("--sweep-only", action="store_true", help="skip the provider table: the config sweep alone")
    p.add_argument("--sweep-budget-s", type=float, help="stop starting sweep rows after this many seconds (each "
                   "new config compiles first); the rows not run are recorded as skipped")
    p.add_argument("--json", help="write results here (rewritten after every row)")
    p.add_argument("--plot", help="write a PNG plot here")
    args = p.parse_args(argv)

    on_cpu = common.setup_interpreter()
    if on_cpu and not args.smoke:
        p.error("the full benchmark needs a CUDA GPU; use --smoke on CPU")
    import torch

    from .op_case import run_case
    from .verdicts import add_speedups, evaluate_targets

    device = torch.device("cpu" if on_cpu else "cuda")
    if args.sweep_only and not args.sweep:
        p.error("--sweep-only needs --sweep")
    try:
        cases = [] if args.sweep_only else plan(args, tuple(PROVIDERS))
    except ValueError as e:
        p.error(str(e))
    env = common.environment()
    print(f"# {env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}", flush=True)
    extra = {"benchmark": "diff_attn", "smoke": args.smoke, "targets": [], "sweep": [], "interrupted": False,
             "min_samples": common.MIN_SAMPLES,
             "flops": {"fwd": "12*N^2*d per diff-head", "bwd": "20*N^2*d per diff-head", "causal": "halved"}}
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    rows = []

    def save():
        add_speedups(rows)
        extra["targets"] = evaluate_targets(rows)
        if args.json:
            common.write_json(args.json, env, rows, extra)

    try:
        for (label, B, H, N, d, causal), dtype, mode, prov in cases:
            if deadline is not None and time.monotonic() > deadline:
                r = dict(provider=prov, shape=label, B=B, H=H, N=N, d=d, causal=causal, dtype=dtype, mode=mode,
                         ms=None, skipped=f"time budget ({args.budget_s:g} s) spent")
            else:
                r = run_case(prov, label, B, H, N, d, causal, dtype, mode, device)
            rows.append(r)
            status = f"{r['ms']:.3f} ms [{r['ms_min']:.3f}, {r['ms_max']:.3f}] n={r['n']}" if r["ms"] \
                else f"skipped: {r['skipped']}"
            print(f"{label:16} B={B:<5} N={N:<6} d={d:<4} {dtype} {mode:8} {prov:14} {status}", flush=True)
            save()
    except KeyboardInterrupt:  # device_check's `timeout -s INT`: keep and report what was measured
        extra["interrupted"] = True
        print("!! interrupted: the table below has the rows measured so far", flush=True)
    save()
    print()
    _print_table(rows)
    for t in extra["targets"]:
        verdict = "met" if t["met"] else ("noise" if t["noise"] else "NOT met")
        vs = f"; x{t['vs_best']:.2f} vs the fastest baseline ({t['best_baseline']})" if t["vs_best"] else ""
        print(f"target {t['target']}: {t['value']} -> {verdict}{vs}")
    if args.plot:
        from .plots import plot_op

        plot_op(rows, args.plot, env["device"])
    if extra["interrupted"]:
        return 130
    if args.sweep:
        from . import sweep

        sweep_shapes = sweep.SMOKE if args.smoke else sweep.SETS[args.sweep]
        dtype0 = "fp32" if args.smoke else args.dtypes.split(",")[0]
        try:
            sweep.run_sweep(sweep_shapes, dtype0, device, budget_s=args.sweep_budget_s, out=extra["sweep"],
                            on_row=save)
        except KeyboardInterrupt:
            extra["interrupted"] = True
            print("!! sweep interrupted: the rows so far are saved", flush=True)
        save()
        for shape, kernels_ in sweep.winners(extra["sweep"]).items():
            print(f"sweep winner {shape}: " + "; ".join(f"{k} {c}" for k, c in kernels_.items()))
    return 130 if extra["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
