"""GQA/MQA in the dense `kernels.diff_attn` (interleaved heads): k (B, 2Hkv, N, d), v (B, Hkv, N, 2d) read in place
by every diff-head of a group, vs a float64 evaluation of the reference on fresh random inputs, outputs poisoned.

H = 8 diff-heads with Hkv = 8, 4, 2, 1 (GROUP 1, 2, 4, 8); d = 64 and 128; N = 1, 77, 197; causal and not. The
gradients of q, k, v, λ (per token) and the norm weight are checked in every backward form (separate, fused, atomic;
`configs.bwd_form` through DIFF_ATTN_BWD); dk/dv of a group are sums over its diff-heads, computed without atomics,
so they are bitwise deterministic in every form.
"""

import pytest
import torch
from cases import call_with_leaves, grads_of, make_lam, make_layout_qkv, to64
from conftest import DEVICE
from tolerances import BWD, BWD_ROW_SUMS, FWD, assert_close, assert_close_lowp

from kernels import diff_attn, diff_attn_reference

H = 8
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["dq", "dk", "dv", "dlam", "dnorm_weight"]
# (Hkv, N, d, causal, norm): every ratio once; each N, d and causal twice across the cells
CELLS = [(8, 77, 64, True, False), (4, 1, 128, False, True), (2, 197, 64, False, True), (1, 77, 128, True, True)]


def _id(hkv, N, d, causal, norm):
    return f"B1-H{H}-Hkv{hkv}-N{N}-d{d}{'-causal' if causal else ''}{'-norm' if norm else ''}"


CASES = [pytest.param(*c, id=_id(*c)) for c in CELLS]


def _inputs(hkv, N, d, causal, norm, dtype, seed=0):
    q, k, v = make_layout_qkv(1, H, hkv, N, d, dtype, DEVICE, requires_grad=True, seed=seed, token_major=seed % 2 == 1)
    # λ per token in [0.5, 0.625] (near 1, N = 1 makes o = (1 - λ)·V vanish and the norm amplify its rounding)
    lam = make_lam("token", 0.5, 1, H, N, DEVICE, requires_grad=True)
    w = None
    if norm:
        w = (1 + 0.5 * torch.randn(2 * d, generator=torch.Generator().manual_seed(seed + 2))).to(DEVICE)
        w.requires_grad_(True)
    dout = torch.randn(1, H, N, 2 * d, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    leaves = [q, k, v, lam] + ([w] if norm else [])
    return leaves, dict(causal=causal, out_scale=0.5 if norm else 1.0), dout


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("hkv,N,d,causal,norm", CASES)
def test_gqa_forward_matches_float64_reference(hkv, N, d, causal, norm, dtype, poison):
    leaves, kw, _ = _inputs(hkv, N, d, causal, norm, dtype)
    with torch.no_grad():
        out = call_with_leaves(diff_attn, leaves, kw)
        ref = call_with_leaves(diff_attn_reference, [to64(x) for x in leaves], kw)
        assert out.shape == (1, H, N, 2 * d) and out.dtype == dtype
        if dtype == torch.bfloat16:
            assert_close_lowp(out, ref, call_with_leaves(diff_attn_reference, leaves, kw), "out")
        else:
            assert_close(out, ref, dtype, FWD, "out")


# Each cell in one dtype per form (fp32 and fp16 alternate), so that every form meets both dtypes and all ratios.
GRAD_CASES = [pytest.param(name, *c, (torch.float32, torch.float16)[(i + j) % 2], id=f"{name}-{_id(*c)}")
              for j, name in enumerate(("separate", "fused", "atomic")) for i, c in enumerate(CELLS)]


@pytest.mark.parametrize("name,hkv,N,d,causal,norm,dtype", GRAD_CASES)
def test_gqa_gradients_match_float64_reference(name, hkv, N, d, causal, norm, dtype, form, poison):
    form(name)
    leaves, kw, dout = _inputs(hkv, N, d, causal, norm, dtype, seed=1)
    ours = grads_of(diff_attn, leaves, kw, dout)
    ref = grads_of(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double())
    for what, a, b, leaf in zip(NAMES, ours, ref, leaves):
        assert a.shape == leaf.shape, what
        table = BWD_ROW_SUMS if what in ("dlam", "dnorm_weight") else BWD
        assert_close(a, b, dtype, table, f"{name} {what}")


@pytest.mark.parametrize("name", ["separate", "fused", "atomic"])
def test_gqa_key_value_gradients_are_bitwise_deterministic(name, form, poison):
    """dk/dv sum a group's diff-heads in registers in a fixed order (no atomics): equal bits on every run, in every
    form (the atomic form's dq is the one gradient allowed to vary). Under the interpreter programs run one after
    another, so only a GPU can show nondeterminism: benchmarks/device_check.sh runs this test there ("deterministic"
    in its filter)."""
    form(name)
    leaves, kw, dout = _inputs(2, 77, 64, True, True, torch.float16, seed=3)
    first = grads_of(diff_attn, leaves, kw, dout)
    second = grads_of(diff_attn, leaves, kw, dout)
    for what, a, b in zip(NAMES, first, second):
        if name == "atomic" and what == "dq":
            continue
        assert torch.equal(a, b), f"{name} {what}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_forward_is_the_op_on_repeated_key_values(causal, poison):
    """A diff-head reads its group's K/V in place: the same bits as the multi-head op on K/V repeated per diff-head
    (every program does the same arithmetic on the same values)."""
    from kernels.reference import expand_heads

    leaves, kw, _ = _inputs(2, 77, 64, causal, True, torch.float16, seed=5)
    q, k, v, lam, w = (x.detach() for x in leaves)
    _, k_rep, v_rep = expand_heads(q, k, v, H)
    assert torch.equal(diff_attn(q, k, v, lam, norm_weight=w, **kw),
                       diff_attn(q, k_rep, v_rep, lam, norm_weight=w, **kw))
