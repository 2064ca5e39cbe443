"""Host overhead on CPU: what our Python costs per call when the GPU work is taken away (issue 19).

    python -m benchmarks.host_overhead [--json out.json] [--repeats 200]

The Triton kernels' launches are stubbed at `JITFunction.run`, the point where a GPU run hands over to Triton's
launcher: everything before it (validation, our config policy, `Autotuner.run`, allocations, autograd) runs as it
would on a GPU, the compiled kernel never does. Autotuning is replaced by a fixed choice (no benchmarking), the
state after the first call of each key on a GPU. The CPU-only finiteness check of λ (a host sync that CUDA
tensors skip) is left out as a GPU run leaves it out. Not counted: Triton's own per-launch cost inside `run`
(binding and specialisation, ~15 µs per launch on the 2-core CI machine) and the CUDA device guard.

Reported, per call (median of `--repeats` after warm-up):
- `diff_attn` inference forward and forward+backward at a DiffCLIP text-like size: host µs, Triton launches,
  kernel-launching aten ops (ops reaching the dispatcher that are not views or allocations), allocations;
- one attention layer's forward+backward, DiffCLIP's (triton backend; λ of a 12-layer encoder amortised) against
  plain CLIP's (one SDPA call): kernel-launching ops, the issue's goal being <= 1.5x;
- a tiny DiffCLIP training step (triton backend) beside the same model with plain attention: host µs and ops.
It must run with Triton's interpreter off (it sets TRITON_INTERPRET=0 before importing Triton, and refuses to run
if Triton was already imported in interpreter mode).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

# Ops that allocate without launching a kernel (counted on their own); views are recognised by `OpOverload.is_view`.
ALLOC_OPS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
NO_KERNEL_OPS = {"detach", "lift_fresh", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
                 "sym_storage_offset", "is_same_size", "_to_copy_noop"}
# Goals on the CI machine (issue 19); tests/benchmarks/test_host_overhead.py holds the counts to them.
GOALS = {"fwd_bwd_us": 100.0, "layer_ops_ratio": 1.5}


class Launches:
    """Stubs Triton's launch: counts the calls instead of running a kernel."""

    def __init__(self):
        self.count = 0

    @contextlib.contextmanager
    def stubbed(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        import kernels
        import kernels.runtime as runtime
        import kernels.validate as validate

        def run(fn_self, *args, **kwargs):
            self.count += 1

        def bench(autotuner_self, *args, config, **meta):
            return [1.0, 1.0, 1.0]  # every config ties: the first fitting one is chosen, with no launch

        saved = (JITFunction.run, Autotuner._bench, runtime.triton_unavailable_reason,
                 kernels.triton_unavailable_reason, validate.check_cpu_lam_finite)
        JITFunction.run, Autotuner._bench = run, bench
        runtime.triton_unavailable_reason = kernels.triton_unavailable_reason = lambda device: None
        # A CUDA λ is not checked for finiteness (it would sync); the CPU tensors here stand in for CUDA ones.
        validate.check_cpu_lam_finite = lambda lam: None
        try:
            yield self
        finally:
            (JITFunction.run, Autotuner._bench, runtime.triton_unavailable_reason,
             kernels.triton_unavailable_reason, validate.check_cpu_lam_finite) = saved


def op_counts(fn) -> dict:
    """Ops reaching the torch dispatcher in one call of `fn` (after autograd and decompositions: about one kernel
    each on a GPU), views and allocations apart, plus host syncs (`.item()`-like reads).

    A dispatch mode makes `kernels.diff_attn` take its traced (torch.library) path; for counting, that check is
    switched off so the eager path a GPU run takes is the one counted."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import kernels.api

    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    traced, kernels.api._traced = kernels.api._traced, lambda tensors: False
    try:
        with Count():
            fn()
    finally:
        kernels.api._traced = traced
    names = [f.overloadpacket.__name__ for f in seen]
    ops = [n for f, n in zip(seen, names) if not f.is_view and n not in ALLOC_OPS and n not in NO_KERNEL_OPS]
    return {"ops": len(ops), "allocations": sum(n in ALLOC_OPS for n in names),
            "host_syncs": names.count("_local_scalar_dense"), "op_names": sorted(ops)}


def host_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def measure(name, fn, launches: Launches, repeats: int) -> dict:
    fn()  # warm-up: first-call work (autotuner cache, imports) is not what a steady state pays
    before = launches.count
    counts = op_counts(fn)
    row = {"case": name, "triton_launches": launches.count - before, **counts}
    row["host_us"] = host_us(fn, repeats)
    row["kernel_launches"] = row["ops"] + row["triton_launches"]
    return row


def _attention_stack(kind: str, layers: int, width: int, heads: int, causal: bool):
    import torch

    from benchmarks.plain_clip import PlainAttention
    from diffclip.layers import DiffAttention, tower_lambdas

    if kind == "plain":
        mods = [PlainAttention(width, heads, causal) for _ in range(layers)]

        def run(x):
            return sum(m(x) for m in mods)
    else:
        mods = [DiffAttention(width, heads, 0.8, causal, backend="triton") for _ in range(layers)]

        def run(x):
            return sum(m(x, lam) for m, lam in zip(mods, tower_lambdas(mods)))
    return torch.nn.ModuleList(mods), run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--json")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and "triton" in sys.modules:
        p.error("Triton is already imported in interpreter mode; run this in a fresh process")
    os.environ["TRITON_INTERPRET"] = "0"
    import torch

    from benchmarks.bench_model import contrastive_loss, make_inputs, smoke_config
    from benchmarks.plain_clip import plain_clip
    from diffclip import DiffCLIP
    from kernels import diff_attn

    torch.manual_seed(0)
    torch.set_num_threads(1)  # host cost is single-threaded; intra-op threads only add noise on a shared machine
    launches = Launches()
    rows = []
    with launches.stubbed(), torch.autocast("cpu", enabled=False):
        # diff_attn at a text-like size (fp16: the kernels' dtype; nothing is computed)
        B, H, N, d = 4, 4, 77, 64
        q = torch.randn(B, N, 2 * H * d, dtype=torch.float16).view(B, N, 2 * H, d).transpose(1, 2)
        k = torch.randn_like(q)
        v = torch.randn(B, N, H, 2 * d, dtype=torch.float16).transpose(1, 2)
        lam = torch.tensor(0.8)
        w = torch.ones(2 * d)
        rows.append(measure("diff_attn fwd (inference)", lambda: diff_attn(q, k, v, lam, causal=True, norm_weight=w),
                            launches, args.repeats))
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        dout = torch.randn(B, H, N, 2 * d, dtype=torch.float16)

        def fwd_bwd():
            for t in (qg, kg, vg):
                t.grad = None
            diff_attn(qg, kg, vg, lam, causal=True, norm_weight=w).backward(dout)
        rows.append(measure("diff_attn fwd+bwd", fwd_bwd, launches, args.repeats))

        # one attention layer, forward + backward, amortised over a 12-layer stack
        layers, width, heads = 12, 128, 4
        x = torch.randn(2, 16, width, requires_grad=True)
        per_layer = {}
        for kind in ("plain", "diffclip"):
            mods, run = _attention_stack(kind, layers, width, heads, causal=True)

            def step(mods=mods, run=run):
                mods.zero_grad(set_to_none=True)
                x.grad = None
                run(x).sum().backward()
            r = measure(f"attention x{layers} fwd+bwd ({kind})", step, launches, max(20, args.repeats // 10))
            rows.append(r)
            per_layer[kind] = r["kernel_launches"] / layers

        # a tiny training step, triton backend vs plain attention
        config = smoke_config()
        image, text = make_inputs(config, 2, torch.device("cpu"), torch.float32)
        for name, model in (("DiffCLIP train step (triton)", DiffCLIP(config, attn_backend="triton")),
                            ("plain CLIP train step", plain_clip(config))):
            model.train()

            def train(model=model):
                model.zero_grad(set_to_none=True)
                contrastive_loss(model(image, text)).backward()
            rows.append(measure(name, train, launches, max(20, args.repeats // 10)))
    summary = {"fwd_bwd_us": rows[1]["host_us"], "layer_ops_plain": per_layer["plain"],
               "layer_ops_diffclip": per_layer["diffclip"],
               "layer_ops_ratio": per_layer["diffclip"] / per_layer["plain"], "goals": GOALS}
    for r in rows:
        print(f"{r['case']:36} {r['host_us']:9.1f} us  launches {r['kernel_launches']:4d} "
              f"(triton {r['triton_launches']}, aten {r['ops']})  allocations {r['allocations']}  "
              f"host syncs {r['host_syncs']}")
    print(f"per attention layer fwd+bwd: diffclip {per_layer['diffclip']:.1f} vs plain {per_layer['plain']:.1f} "
          f"kernel launches ({summary['layer_ops_ratio']:.2f}x; goal <= {GOALS['layer_ops_ratio']}x); "
          f"diff_attn fwd+bwd {summary['fwd_bwd_us']:.0f} us (goal <= {GOALS['fwd_bwd_us']:.0f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "host_overhead", "summary": summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
