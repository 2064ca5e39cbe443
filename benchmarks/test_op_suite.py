"""pytest-benchmark suite: the op per provider at the DiffCLIP shapes (tiny shapes on CPU).

    pytest benchmarks --benchmark-only                       # GPU: DiffCLIP vision/text shapes, bf16
    pytest benchmarks --benchmark-only --benchmark-max-time=0.05   # CPU: tiny shapes, interpreter

Not part of `pytest tests`, so it never slows the normal run. On CUDA each call is synchronised so the
wall-clock numbers cover the kernel.
"""

import pytest
import torch

from benchmarks.providers import COMPILED, PROVIDERS, fresh, skip_reason

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = ([("vision", 32, 6, 197, 64, False), ("text", 256, 4, 77, 64, True)] if CUDA
          else [("vision-tiny", 1, 2, 20, 16, False), ("text-tiny", 1, 2, 12, 16, True)])


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("label,B,H,N,d,causal", [pytest.param(*s, id=f"{s[0]}-B{s[1]}-H{s[2]}-N{s[3]}-d{s[4]}")
                                                  for s in SHAPES])
def test_forward(benchmark, provider, label, B, H, N, d, causal):
    reason = skip_reason(provider, DEVICE)
    if reason is None and provider in COMPILED and not CUDA:
        reason = "torch.compile takes tens of seconds to build per shape on CPU; the CPU suite is a smoke run"
    if reason:
        pytest.skip(reason)
    fn = fresh(provider)
    q = torch.randn(B, 2 * H, N, d, device=DEVICE, dtype=DTYPE)
    k = torch.randn(B, 2 * H, N, d, device=DEVICE, dtype=DTYPE)
    v = torch.randn(B, H, N, 2 * d, device=DEVICE, dtype=DTYPE)
    lam = torch.tensor(0.8, device=DEVICE)

    def step():
        out = fn(q, k, v, lam, causal=causal)
        if CUDA:
            torch.cuda.synchronize()
        return out

    out = benchmark(step)
    assert out.shape == (B, H, N, 2 * d) and torch.isfinite(out).all()
