"""Output allocation for the kernels: no deterministic-mode fill, and an opt-in NaN poison for tests.

Every buffer allocated here is written in full by the kernel it is made for before anything reads it: each output
element has exactly one writer program, and masked tails are stored, not skipped. The NaN-poison tests
(`poison_outputs`, the `poison` fixture) check that: with poisoning on, every buffer starts as NaN, so an element a
kernel forgot to write (a masked tail, a skipped block) fails the comparison instead of passing on leftover memory.

That is also why the fill of deterministic mode is skipped here. Under `torch.use_deterministic_algorithms(True)`
PyTorch fills every `torch.empty` with NaN (`torch.utils.deterministic.fill_uninitialized_memory`), so that code
which reads uninitialised memory reads the same values on every run. For buffers that are overwritten in full the
fill cannot change any result and is pure memory traffic (about 315 MB per forward+backward at DiffCLIP's vision
shape), so it is switched off around these allocations only and restored at once. The flag is process-wide: a
`torch.empty` on another Python thread during those few microseconds would also skip its fill (not its
determinism guarantees for ops, only the NaN contents of its uninitialised memory).
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


def _unfilled(make):
    """`make()` (an allocation) without deterministic mode's NaN fill; see the module docstring for why."""
    if not torch.are_deterministic_algorithms_enabled():  # the common case first: one cheap C call
        return make()
    det = torch.utils.deterministic
    if not det.fill_uninitialized_memory:
        return make()
    det.fill_uninitialized_memory = False
    try:
        return make()
    finally:
        det.fill_uninitialized_memory = True


def empty(*shape, dtype, device) -> torch.Tensor:
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return _unfilled(lambda: torch.empty(*shape, dtype=dtype, device=device))


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """Like torch.empty_like: keeps x's strides when x is dense (e.g. a transposed view of a projection)."""
    if _poison:
        return torch.full_like(x, float("nan"))
    return _unfilled(lambda: torch.empty_like(x))
