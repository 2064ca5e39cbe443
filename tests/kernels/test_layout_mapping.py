"""Which heads each diff-head reads, written out by hand for every head layout, against the kernel (forward and
every backward form) at B = 2.

The GQA and head-layout tests elsewhere compare the kernel with `diff_attn_reference`, and the references of every
layout share one helper (`reference.expand_heads`): a wrong group mapping there would pass them all. Here the mapping
is spelled out per diff-head with plain loops (no shared helper), in float64, so the kernel and that helper are both
checked against it; B = 2 also exercises the batch index of the GQA dK/dV and dQ programs (b = program // Hkv).
"""

import pytest
import torch
from cases import make_layout_qkv, to64
from conftest import DEVICE
from tolerances import BWD, BWD_ROW_SUMS, FWD, assert_close

from kernels import diff_attn, diff_attn_reference


def explicit(q, k, v, lam, layout, causal):
    """Float64 differential attention, one diff-head at a time, heads chosen as the README's table says."""
    B, H2, N, d = q.shape
    H = H2 // 2
    hkv = k.shape[1] if layout == "v2" else k.shape[1] // 2
    group = H // hkv
    hidden = torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1) if causal else None
    outs = []
    for h in range(H):
        g = h // group
        if layout == "interleaved":
            heads_q, heads_k, value = (2 * h, 2 * h + 1), (2 * g, 2 * g + 1), v[:, g]
        elif layout == "halves":
            heads_q, heads_k, value = (h, h + H), (g, g + hkv), torch.cat([v[:, g], v[:, g + hkv]], dim=-1)
        else:  # v2: one key head and one d-wide value head for both maps
            heads_q, heads_k, value = (2 * h, 2 * h + 1), (g, g), v[:, g]
        maps = []
        for hq, hk in zip(heads_q, heads_k):
            s = q[:, hq] @ k[:, hk].transpose(-1, -2) * d**-0.5
            if causal:
                s = s.masked_fill(hidden, float("-inf"))
            maps.append(torch.softmax(s, dim=-1))
        outs.append((maps[0] - lam[:, h, :, None] * maps[1]) @ value)
    return torch.stack(outs, dim=1)


CELLS = [  # (layout, H, Hkv, causal)
    ("interleaved", 4, 2, False),
    ("interleaved", 4, 1, True),
    ("halves", 4, 2, True),
    ("halves", 4, 4, False),
    ("v2", 4, 2, False),
    ("v2", 4, 1, True),
]
N, D = 21, 16


def _inputs(layout, H, hkv, dtype, seed):
    q, k, v = make_layout_qkv(2, H, hkv, N, D, dtype, DEVICE, layout, requires_grad=True, seed=seed)
    lam = (0.3 + 0.4 * torch.rand(2, H, N, generator=torch.Generator().manual_seed(seed + 7))).to(DEVICE)
    return [q, k, v, lam.requires_grad_(True)]


@pytest.mark.parametrize("layout,H,hkv,causal", [pytest.param(*c, id=f"{c[0]}-B2-H{c[1]}-Hkv{c[2]}-N{N}-d{D}"
                                                              f"{'-causal' if c[3] else ''}") for c in CELLS])
def test_kernel_and_reference_read_the_heads_the_layout_names(layout, H, hkv, causal, poison):
    leaves = _inputs(layout, H, hkv, torch.float32, seed=3)
    want = explicit(*[to64(x) for x in leaves], layout, causal)
    with torch.no_grad():
        got = diff_attn(*leaves, causal=causal, head_layout=layout)
        ref = diff_attn_reference(*[to64(x) for x in leaves], causal=causal, head_layout=layout)
    torch.testing.assert_close(ref, want, rtol=1e-12, atol=1e-12)  # the reference's shared helper
    assert_close(got, want, torch.float32, FWD, f"{layout} out")


@pytest.mark.parametrize("name", ["separate", "fused", "atomic"])
@pytest.mark.parametrize("layout,H,hkv,causal", [pytest.param(*c, id=f"{c[0]}-B2-H{c[1]}-Hkv{c[2]}-N{N}-d{D}"
                                                              f"{'-causal' if c[3] else ''}") for c in CELLS[::2]])
def test_gradients_sum_over_the_heads_the_layout_names(layout, H, hkv, causal, name, form, poison):
    form(name)
    leaves = _inputs(layout, H, hkv, torch.float32, seed=5)
    width = D if layout == "v2" else 2 * D
    dout = torch.randn(2, H, N, width, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    ours = torch.autograd.grad(diff_attn(*leaves, causal=causal, head_layout=layout), leaves, dout)
    ref_leaves = [to64(x).detach().requires_grad_(True) for x in leaves]
    want = torch.autograd.grad(explicit(*ref_leaves, layout, causal), ref_leaves, dout.double())
    for what, a, b in zip(["dq", "dk", "dv", "dlam"], ours, want):
        assert_close(a, b, torch.float32, BWD_ROW_SUMS if what == "dlam" else BWD, f"{name} {layout} {what}")
