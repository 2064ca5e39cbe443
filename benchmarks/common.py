"""Shared benchmark plumbing: environment record, timing, FLOP counts, JSON/plot output.

Import this only after deciding whether Triton runs in interpreter mode (see `setup_interpreter`): it imports
Triton.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_interpreter() -> bool:
    """Without CUDA, run Triton kernels through the interpreter (must happen before Triton is imported).
    Returns True when on CPU."""
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("TRITON_INTERPRET", "1")
    return True


def qkv_inputs(B, H, N, d, dtype, device, grad=False):
    """Deterministic q, k (B, 2H, N, d) and v (B, H, N, 2d), strided like a model's projections ((B, N, 2H·d)
    viewed and transposed), and λ = 0.8 as a 0-d tensor."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, N, 2 * H * d, generator=g).to(device, dtype).view(B, N, 2 * H, d).transpose(1, 2)
    k = torch.randn(B, N, 2 * H * d, generator=g).to(device, dtype).view(B, N, 2 * H, d).transpose(1, 2)
    v = torch.randn(B, N, 2 * H * d, generator=g).to(device, dtype).view(B, N, H, 2 * d).transpose(1, 2)
    lam = torch.tensor(0.8, device=device)
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return q, k, v, lam


def flops_fwd(B, H, N, d, causal) -> float:
    """Forward FLOPs: 12·N²·d per diff-head (two QKᵀ of 2N²d, two P·V of 2N²·2d), halved when causal."""
    return 12.0 * B * H * N * N * d * (0.5 if causal else 1.0)


def flops_bwd(B, H, N, d, causal) -> float:
    """Backward FLOPs: 20·N²·d per diff-head (recompute both score maps 4, dV on the combined map 4, the shared
    dP 4, dQ 4, dK 4; in units of N²·d), halved when causal. Our dQ kernel recomputes the maps once more; like
    flash-attention's convention, that recomputation is not counted."""
    return 20.0 * B * H * N * N * d * (0.5 if causal else 1.0)


def flops(mode, B, H, N, d, causal) -> float:
    f, b = flops_fwd(B, H, N, d, causal), flops_bwd(B, H, N, d, causal)
    return {"fwd": f, "bwd": b, "fwd+bwd": f + b}[mode]


@contextlib.contextmanager
def environ(**values):
    """Environment variables set for the block and restored after (the kernels read DIFF_ATTN_BWD per call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def reason(e: BaseException) -> str:
    """One line for a row that failed: the exception type and the first line of its message (200 characters)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()}, no GPU)"
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
    }


# Timed iterations per row: fewer cannot tell a difference from noise (the first H200 run had one per train step).
MIN_SAMPLES = 10


def timing(times_ms) -> dict:
    """{ms (median), ms_min, ms_max, n} of a list of per-iteration times."""
    return {"ms": statistics.median(times_ms), "ms_min": min(times_ms), "ms_max": max(times_ms),
            "n": len(times_ms)}


def bench(fn, *, grad_to_none=None, min_samples: int = MIN_SAMPLES, cpu_samples: int = 3) -> dict:
    """Per-iteration milliseconds of `fn` as `timing(...)`. On CUDA: `triton.testing.do_bench` (warm-up first,
    L2 flushed before each run, gradients reset) with its time budget raised so that at least `min_samples` runs
    are timed. On CPU (smoke mode): `cpu_samples` wall-clock runs after one warm-up; such numbers exercise the
    code, they claim nothing."""
    if torch.cuda.is_available():
        import triton.testing

        _reset(grad_to_none)
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _reset(grad_to_none)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end), 1e-3)
        # do_bench times int(rep / its own estimate) runs: 1.5x headroom keeps that at min_samples or above.
        rep = max(100.0, 1.5 * min_samples * estimate)
        times = triton.testing.do_bench(fn, warmup=max(25.0, 2 * estimate), rep=rep, grad_to_none=grad_to_none,
                                        return_mode="all")
        return timing([float(t) for t in times])
    fn()
    times = []
    for _ in range(cpu_samples):
        _reset(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return timing(times)


def bench_ms(fn, *, grad_to_none=None) -> float:
    """Median milliseconds of `bench` (callers that need the spread use `bench`)."""
    return bench(fn, grad_to_none=grad_to_none)["ms"]


def _reset(grads):
    for t in grads or ():
        t.grad = None


def same_within_noise(a: dict, b: dict) -> bool:
    """True when two timings' [min, max] ranges overlap: their difference is smaller than the spread of the runs,
    so no ratio between them is a result."""
    return a["ms_min"] <= b["ms_max"] and b["ms_min"] <= a["ms_max"]


# ~0.1 s of GPU clock cycles: host_ms's calls must all be enqueued before the device finishes this sleep.
_SLEEP_CYCLES = 200_000_000


def host_ms(fn, *, calls: int = 20, grad_to_none=None) -> float | None:
    """Host (CPU) milliseconds per call: the Python, dispatcher and launch cost alone. The GPU is first given a long
    sleep, so every launch only queues and no call waits on the device; `bench` near this value means the case
    is bound by launch overhead, not by the kernels. Gradients are reset before each call, as `bench` does.

    None on CPU (no such split) and when the measurement is invalid: an event recorded right after the sleep must
    still be pending when the loop ends. If it is not, the sleep ran out while calls were being made (a call
    waited on the device, or the launch queue filled up and blocked), so the time includes device work."""
    if not torch.cuda.is_available():
        return None
    _reset(grad_to_none)
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(_SLEEP_CYCLES)
    after_sleep = torch.cuda.Event()
    after_sleep.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        _reset(grad_to_none)
        fn()
    elapsed = time.perf_counter() - t0
    still_sleeping = not after_sleep.query()
    torch.cuda.synchronize()
    return elapsed / calls * 1e3 if still_sleeping else None


def device_kernel_events(events):
    """The device-side kernel events of a profile (torch's own rule for its "Self CUDA total"): events on a GPU
    device, not user annotations. Device time attached to CPU ops is the same kernels seen from the host, so
    adding it again would double-count."""
    from torch.autograd import DeviceType

    gpu_types = {getattr(DeviceType, n) for n in ("CUDA", "PrivateUse1", "MTIA", "XPU") if hasattr(DeviceType, n)}
    return [e for e in events if e.device_type in gpu_types and not getattr(e, "is_user_annotation", False)]


def device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)


def kernel_ms(step, name: str, *, iters: int = MIN_SAMPLES, grad_to_none=None) -> dict | None:
    """Device time of the kernels whose name contains `name`, per `step`, as `timing(...)` over `iters` steps
    profiled in one session (after two warm-up steps): one kernel timed alone, whatever else the step launches
    (the config sweep's backward rows). L2 is not flushed between steps here. None on CPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        _reset(grad_to_none)
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            _reset(grad_to_none)
            step()
        torch.cuda.synchronize()
    return timing(per_step_ms(prof.events(), name, iters))


def kernel_names(step) -> list | None:
    """The distinct device kernels one call of `step` launches, in launch order (which SDPA backend ran: cuDNN,
    FlashAttention, memory-efficient). None on CPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(device_kernel_events(prof.events()), key=lambda e: e.time_range.start)
    return list(dict.fromkeys(e.name[:120] for e in events))


def per_step_ms(events, name: str, steps: int) -> list:
    """Device milliseconds per step of the kernels named like `name`, from a profile of `steps` identical steps:
    the matching device kernel events in launch order, split into `steps` equal groups."""
    hits = sorted((e for e in device_kernel_events(events) if name in e.name), key=lambda e: e.time_range.start)
    if not hits or len(hits) % steps:
        raise RuntimeError(f"expected the same number of {name!r} kernels in each of {steps} steps, "
                           f"profiled {len(hits)}")
    per = len(hits) // steps
    return [sum(device_us(e) for e in hits[i * per:(i + 1) * per]) / 1e3 for i in range(steps)]


def peak_memory_mb(fn) -> float | None:
    """Peak CUDA memory allocated while `fn` runs, above what was allocated before (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_json(path: str, env: dict, rows: list, extra: dict | None = None) -> None:
    """Write (or rewrite) the results file. Benchmarks call it after every row, so a run killed by a time limit
    keeps what it measured; the temporary file + rename means a kill mid-write never leaves a torn file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump({**env, **(extra or {}), "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def print_table(rows: list, columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format)."""
    head = "  ".join(f"{h:>{max(len(h), 9)}}" for _, h, _ in columns)
    print(head)
    for r in rows:
        cells = []
        for key, h, fmt in columns:
            v = r.get(key)
            width = max(len(h), 9)
            cells.append(f"{'-' if v is None else format(v, fmt):>{width}}")
        print("  ".join(cells))
