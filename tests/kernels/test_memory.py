"""The fused op saves O(N·d) for backward; the eager reference saves its (N, N) maps."""

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
