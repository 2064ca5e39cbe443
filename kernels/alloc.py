"""Output allocation for the kernels, with an opt-in NaN poison for tests.

With poisoning on, every buffer a kernel is meant to overwrite starts as NaN, so an element the kernel forgot to
write (a masked tail, a skipped block) fails the comparison instead of passing on leftover memory.
"""

from __future__ import annotations

import contextlib

import torch

_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within this block, kernel output buffers are filled with NaN before each launch (testing aid)."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def empty(*shape, dtype, device) -> torch.Tensor:
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """Like torch.empty_like: keeps x's strides when x is dense (e.g. a transposed view of a projection)."""
    out = torch.empty_like(x)
    if _poison:
        out.fill_(float("nan"))
    return out
