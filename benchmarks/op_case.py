"""One case of the op benchmark: one provider at one (shape, dtype, mode), checked against the fp32 reference, then
timed (median, min, max of at least `common.MIN_SAMPLES` runs), its host time, CUDA-graph time and peak memory.

A provider that fails the check, cannot run here or raises is recorded with the reason instead of a time.
"""

from __future__ import annotations

import torch

from . import common

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Providers that materialise the N x N maps, and how much of them a case may allocate before it is skipped.
MATERIALISING = ("eager", "eager-official", "compile")
MAP_BYTES_LIMIT = 16 * 2**30
# fp32 memory one diff-head's reference may hold at once (two N x N maps, their softmax, autograd's saved state).
REFERENCE_CHUNK_BYTES = 4 * 2**30


def upstream_gradient(shape, dtype, device) -> torch.Tensor:
    """A seeded random dO for the gradient check and the timed backward. A constant one would hide a backward that
    permutes dV's columns (every column of Pᵀ·1 is the same)."""
    g = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randn(shape, generator=g).to(device, dtype)


def _reference(q, k, v, lam, causal, dout):
    """fp32 `diff_attn_reference` outputs [out] (+ [dq, dk, dv] when `dout` is given), computed over chunks of
    diff-heads so that a long sequence (N = 8192: 0.5 GB per fp32 map) never holds every head's maps at once."""
    from kernels import diff_attn_reference

    if not (isinstance(lam, torch.Tensor) and lam.dim() == 0):
        raise ValueError("the benchmark's reference chunks over heads: it needs one λ (a 0-d tensor)")
    B, H2, N, d = q.shape
    H = H2 // 2
    pairs = [t.detach().float().reshape(B * H, 2, N, d) for t in (q, k)]  # diff-head h = heads 2h, 2h+1
    vf = v.detach().float().reshape(B * H, 1, N, 2 * d)
    dof = dout.float().reshape(B * H, 1, N, 2 * d) if dout is not None else None
    step = max(1, REFERENCE_CHUNK_BYTES // (12 * N * N * 4))
    parts = []
    for i in range(0, B * H, step):
        qc, kc, vc = (t[i:i + step].requires_grad_(dout is not None) for t in (*pairs, vf))
        out = diff_attn_reference(qc, kc, vc, lam.float(), causal=causal)
        grads = torch.autograd.grad(out, (qc, kc, vc), dof[i:i + step]) if dout is not None else ()
        parts.append([out.detach(), *grads])
    shapes = [(B, H, N, 2 * d), (B, H2, N, d), (B, H2, N, d), (B, H, N, 2 * d)]
    return [torch.cat(col).reshape(shape) for col, shape in zip(zip(*parts), shapes)]


_REFERENCE_CACHE: dict = {}


def check(fn, q, k, v, lam, causal, mode) -> float:
    """Largest relative L2 error of the output (and of dq, dk, dv for bwd modes) against the fp32 reference, which
    is computed once per case (inputs are deterministic) and shared by all providers."""
    grad = mode != "fwd"
    out = fn(q, k, v, lam, causal=causal)
    dout = upstream_gradient(out.shape, out.dtype, out.device) if grad else None
    ours = [out, *torch.autograd.grad(out, (q, k, v), dout)] if grad else [out]
    key = (tuple(q.shape), q.dtype, str(q.device), causal, grad)
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE.clear()  # one case at a time: keep device memory for the providers
        _REFERENCE_CACHE[key] = _reference(q, k, v, lam, causal, dout)
    ref = _REFERENCE_CACHE[key]
    return max(((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(ours, ref))


def graph_timing(fn, q, k, v, lam, causal, mode):
    """(timing, None) of the same step replayed from CUDA graphs (`torch.cuda.make_graphed_callables`: forward, and
    backward for fwd+bwd), i.e. the kernels without Python and launch costs; (None, reason) when capture fails.
    Next to `ms` and `host_ms` it says what removing the host's share would give, for every provider alike."""
    try:
        graphed = torch.cuda.make_graphed_callables(lambda q_, k_, v_: fn(q_, k_, v_, lam, causal=causal), (q, k, v))
        if mode == "fwd":
            def step():
                return graphed(q, k, v)
            grads = None
        else:
            out = graphed(q, k, v)
            dout = upstream_gradient(out.shape, out.dtype, out.device)

            def step():
                graphed(q, k, v).backward(dout)
            grads = [q, k, v]
        return common.bench(step, grad_to_none=grads), None
    except Exception as e:  # capture is an extra: its failure is recorded, the row keeps its other numbers
        return None, common.reason(e)


def _set_timing(row, prefix, t):
    if t is not None:
        row.update({f"{prefix}ms": t["ms"], f"{prefix}ms_min": t["ms_min"], f"{prefix}ms_max": t["ms_max"],
                    f"{prefix}n": t["n"]})


def run_case(provider, label, B, H, N, d, causal, dtype_name, mode, device):
    from .providers import PROVIDER_ENV

    with common.environ(**PROVIDER_ENV.get(provider, {})):
        return _run_case(provider, label, B, H, N, d, causal, dtype_name, mode, device)


def _run_case(provider, label, B, H, N, d, causal, dtype_name, mode, device):
    from .providers import Compiled, fresh, skip_reason

    dtype = DTYPES[dtype_name]
    row = dict(provider=provider, shape=label, B=B, H=H, N=N, d=d, causal=causal, dtype=dtype_name, mode=mode,
               ms=None, ms_min=None, ms_max=None, n=None, host_ms=None, tflops=None, peak_mb=None, rel_err=None,
               skipped=None)
    reason = skip_reason(provider, device)
    if reason is None and provider in MATERIALISING and B * 2 * H * N * N * 4 > MAP_BYTES_LIMIT:
        reason = f"{provider} would materialise > {MAP_BYTES_LIMIT / 2**30:g} GiB of attention maps"
    if reason:
        row["skipped"] = reason
        return row
    grad = mode != "fwd"
    try:
        fn = fresh(provider)
        q, k, v, lam = common.qkv_inputs(B, H, N, d, dtype, device, grad)
        row["rel_err"] = check(fn, q, k, v, lam, causal, mode)
        limit = 1e-4 if dtype == torch.float32 else 2e-2
        if not row["rel_err"] <= limit:
            row["skipped"] = f"output check failed: rel err {row['rel_err']:.2e} > {limit:.0e}"
            return row
        if mode == "fwd":
            def step():
                return fn(q, k, v, lam, causal=causal)
        else:
            out = fn(q, k, v, lam, causal=causal)
            dout = upstream_gradient(out.shape, out.dtype, out.device)
            if mode == "bwd":
                def step():
                    out.backward(dout, retain_graph=True)
            else:
                def step():
                    fn(q, k, v, lam, causal=causal).backward(dout)
        grads = [q, k, v] if grad else None
        if isinstance(fn, Compiled):  # what is timed must be compiled code, not Dynamo's eager fallback
            runs = fn.runs
            step()
            if fn.graphs == 0 or (mode != "bwd" and fn.runs == runs):
                row["skipped"] = "torch.compile ran no compiled graph (eager fallback): not timed"
                return row
            graphs = fn.graphs
        _set_timing(row, "", common.bench(step, grad_to_none=grads))
        if isinstance(fn, Compiled):
            row["compiled_graphs"] = fn.graphs
            if fn.graphs != graphs:  # the timed runs mixed compilation in: no number
                row.update(ms=None, ms_min=None, ms_max=None, n=None,
                           skipped=f"torch.compile recompiled while timing ({graphs} -> {fn.graphs} graphs)")
                return row
        row["tflops"] = common.flops(mode, B, H, N, d, causal) / (row["ms"] * 1e-3) / 1e12
        row["peak_mb"] = common.peak_memory_mb(step)
        # The host's share: a case whose ms is close to host_ms is launch-bound (small N), not kernel-bound.
        row["host_ms"] = common.host_ms(step, grad_to_none=grads)
        if provider.startswith("triton"):  # the configs autotuning chose for this case (latest launch of each)
            from kernels import configs

            launched = ("fwd",) if mode == "fwd" else (("fwd", "dkdv", "dq") if provider == "triton" else
                                                       ("fwd", configs.bwd_form()))
            row["configs"] = {k: configs.describe(configs.LAST_CONFIG[k]) for k in launched
                              if k in configs.LAST_CONFIG}
        if device.type == "cuda":  # which kernels ran (the SDPA backend chosen, the fused combine, ...)
            row["kernels"] = common.kernel_names(step)
        if device.type == "cuda" and mode != "bwd":
            t, row["graph_skipped"] = graph_timing(fn, q, k, v, lam, causal, mode)
            _set_timing(row, "graph_", t)
    except torch.cuda.OutOfMemoryError:
        row["skipped"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as e:  # a provider that breaks must not end the whole benchmark: record why
        row["skipped"] = common.reason(e)
    return row
