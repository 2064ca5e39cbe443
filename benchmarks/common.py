"""Shared benchmark plumbing: environment record, timing, FLOP counts, JSON/plot output.

Import this only after deciding whether Triton runs in interpreter mode (see `setup_interpreter`): it imports
Triton.
"""

from __future__ import annotations

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


def bench_ms(fn, *, grad_to_none=None) -> float:
    """Median milliseconds. On CUDA: `triton.testing.do_bench` (warm-up first, L2 flushed between runs). On CPU
    (smoke mode): a few wall-clock runs after one warm-up; such numbers exercise the code, they claim nothing."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_ms(fn, *, calls: int = 20) -> float | None:
    """Host (CPU) milliseconds per call: the Python, dispatcher and launch cost alone. The GPU is first given a long
    sleep, so every launch only queues and no call waits on the device; `bench_ms` near this value means the case
    is bound by launch overhead, not by the kernels (None on CPU, where there is no such split)."""
    if not torch.cuda.is_available():
        return None
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU clock cycles: longer than the calls below take to enqueue
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t0
    torch.cuda.synchronize()
    return elapsed / calls * 1e3


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**env, **(extra or {}), "rows": rows}, f, indent=1)


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
