"""The fused op saves O(N·d) for backward; the eager reference saves its (N, N) maps."""

import pytest
import torch
from cases import make_qkv
from conftest import DEVICE

from kernels import diff_attn, diff_attn_reference


def saved_bytes(fn, N, norm):
    q, k, v = make_qkv(1, 2, N, 16, torch.float32, DEVICE, requires_grad=True)
    lam = torch.tensor(0.8, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True) if norm else None
    seen = {}

    def pack(t):
        # Distinct storages only: the same buffer saved twice costs once. Expanded λ views cost their storage.
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v, lam, norm_weight=w, causal=True)
    return sum(seen.values())


def test_saved_state_linear_for_kernel_quadratic_for_reference(poison):
    for norm in (False, True):
        small, large = saved_bytes(diff_attn, 64, norm), saved_bytes(diff_attn, 256, norm)
        assert large <= 4.2 * small, f"fused op saves {small} B at N=64 but {large} B at N=256 (norm={norm})"
        ref_small, ref_large = saved_bytes(diff_attn_reference, 64, norm), saved_bytes(diff_attn_reference, 256, norm)
        assert ref_large >= 10 * ref_small, (ref_small, ref_large)
        assert large < ref_large / 4



class _NoLaunch:
    """Stands in for the kernel launches: Triton's interpreter allocates host copies of its own with torch.empty,
    which would be counted too. Only the allocations of the launch helpers remain."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def __call__(self, *args, **kwargs):
        return None


def _fills_per_step(deterministic, monkeypatch):
    """aten::fill_ calls in one forward+backward (norm epilogue, a λ gradient) with deterministic mode on or off."""
    pytest.importorskip("triton")
    from kernels import bwd, fwd

    monkeypatch.setattr(fwd, "launch", _NoLaunch())
    monkeypatch.setattr(bwd, "launch", _NoLaunch())
    monkeypatch.setattr(bwd, "_bwd_preprocess_kernel", _NoLaunch())
    q, k, v = make_qkv(1, 2, 40, 16, torch.float32, DEVICE, requires_grad=True)
    lam = torch.tensor(0.8, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    dout = torch.randn(1, 2, 40, 32, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            diff_attn(q, k, v, lam, norm_weight=w, causal=True).backward(dout)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.utils.deterministic.fill_uninitialized_memory  # restored
    return sum(e.name == "aten::fill_" and not _under(e, "aten::isfinite") for e in prof.events())


def _under(event, name):
    """Whether a profiler event ran inside `name` (validation's finiteness check of a CPU λ: its temporaries are
    torch.empty too, filled in deterministic mode, and are not kernel buffers)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def test_deterministic_mode_does_not_fill_kernel_buffers(monkeypatch):
    """Issue 20, item 3: under torch.use_deterministic_algorithms(True) PyTorch NaN-fills every torch.empty; the
    kernels' buffers are written in full (the poison tests check that), so kernels/alloc.py skips that fill. One
    forward+backward (launches stubbed) makes as many fills in deterministic mode as without it (11 more before:
    out, lse, o2, o_pre, Δ, dO, the dw partials, dλ, dq, dk, dv)."""
    assert _fills_per_step(True, monkeypatch) == _fills_per_step(False, monkeypatch)
