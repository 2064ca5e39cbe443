"""Backward kernels vs autograd through a float64 evaluation of the reference.

Covering design over N in {1, 77, 130, 197} x causal x dtype; λ value (0, 0.8, 1.4), λ kind (scalar, per head,
per token), epilogue, head dim and layout cycle across cells.
"""

import itertools

import pytest
import torch
from cases import make_lam, make_qkv, to64
from conftest import DEVICE
from tolerances import BWD, FWD, assert_close, assert_close_lowp

from kernels import diff_attn, diff_attn_reference

NS = [1, 77, 130, 197]
LAMS = [0.0, 0.8, 1.4]
LAM_KINDS = ["scalar", "head", "token"]
DS = [16, 32, 64, 128]
LAYOUTS = ["contiguous", "linear", "fused"]
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def _cases():
    out = []
    for i, (N, causal, norm) in enumerate(itertools.product(NS, (False, True), (False, True))):
        lam, kind = LAMS[i % 3], LAM_KINDS[(i // 2) % 3]
        d, layout = DS[i % 4], LAYOUTS[(i // 3) % 3]
        B, H = 1 + (i // 4) % 2, 1 + i % 2
        cid = f"B{B}-H{H}-N{N}-d{d}{'-causal' if causal else ''}-lam{lam}-{kind}{'-norm' if norm else ''}-{layout}"
        out.append(pytest.param(B, H, N, d, causal, lam, kind, norm, layout, id=cid))
    return out


def _inputs(B, H, N, d, causal, lam_value, kind, norm, layout, dtype, seed=0):
    q, k, v = make_qkv(B, H, N, d, dtype, DEVICE, layout, requires_grad=True, seed=seed)
    lam = make_lam(kind, lam_value, B, H, N, DEVICE, requires_grad=True)
    w = None
    if norm:
        g = torch.Generator().manual_seed(seed + 3)
        w = (1 + 0.5 * torch.randn(2 * d, generator=g)).to(DEVICE).requires_grad_(True)
    leaves = [q, k, v, lam] + ([w] if norm else [])
    kw = dict(causal=causal, out_scale=0.2 if norm else 0.7)
    g = torch.Generator().manual_seed(seed + 5)
    dout = torch.randn(B, H, N, 2 * d, generator=g).to(DEVICE, dtype)
    return leaves, kw, dout


def _grads(fn, leaves, kw, dout):
    q, k, v, lam = leaves[:4]
    w = leaves[4] if len(leaves) > 4 else None
    out = fn(q, k, v, lam, norm_weight=w, **kw)
    return torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("B,H,N,d,causal,lam,kind,norm,layout", _cases())
def test_gradients_match_float64_reference(B, H, N, d, causal, lam, kind, norm, layout, dtype, poison):
    leaves, kw, dout = _inputs(B, H, N, d, causal, lam, kind, norm, layout, dtype)
    ours = _grads(diff_attn, leaves, kw, dout)
    ref = _grads(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double())
    lowp = _grads(diff_attn_reference, leaves, kw, dout) if dtype == torch.bfloat16 else None
    for i, name in enumerate(["dq", "dk", "dv", "dlam", "dnorm_weight"][: len(leaves)]):
        assert ours[i].shape == leaves[i].shape, name
        # λ and the norm weight are fp32 parameters: their gradients come back in fp32 whatever the inputs.
        if lowp is not None:
            assert_close_lowp(ours[i], ref[i], lowp[i], name)
        else:
            assert_close(ours[i], ref[i], dtype, BWD, name)


@pytest.mark.parametrize("kind", ["scalar", "head", "token"])
def test_lambda_gradient_has_lambda_shape(kind, poison):
    B, H, N, d = 2, 3, 33, 16
    leaves, kw, dout = _inputs(B, H, N, d, False, 0.8, kind, False, "contiguous", torch.float32)
    g = _grads(diff_attn, leaves, kw, dout)[3]
    assert g.shape == leaves[3].shape == {"scalar": (), "head": (H,), "token": (B, H, N)}[kind]


def test_python_float_lambda_gets_no_gradient(poison):
    q, k, v = make_qkv(1, 2, 40, 32, torch.float32, DEVICE, requires_grad=True)
    out = diff_attn(q, k, v, 0.5)
    out.sum().backward()  # a zero-stride incoming gradient, too
    ref = [to64(x) for x in (q, k, v)]
    diff_attn_reference(*ref, 0.5).sum().backward()
    for ours, theirs in zip((q, k, v), ref):
        assert_close(ours.grad, theirs.grad, torch.float32, BWD, "grad")


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_backward_is_deterministic(norm, poison):
    leaves, kw, dout = _inputs(2, 2, 197, 64, True, 0.8, "token", norm, "linear", torch.float16)
    first = _grads(diff_attn, leaves, kw, dout)
    second = _grads(diff_attn, leaves, kw, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_only_requested_gradients(poison):
    """λ without requires_grad and a frozen norm weight: the op still differentiates q, k, v."""
    q, k, v = make_qkv(1, 1, 20, 16, torch.float32, DEVICE, requires_grad=True)
    lam = torch.tensor(0.3, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    out = diff_attn(q, k, v, lam, norm_weight=w)
    dq, = torch.autograd.grad(out, [q], torch.ones_like(out))
    assert torch.isfinite(dq).all()


def test_gradcheck_float64_through_float32_kernel():
    """Finite differences on a tiny problem: the kernel runs fp32, so compare its analytic gradient with a
    float64 finite-difference estimate of the reference (gradcheck itself needs a float64 op)."""
    torch.manual_seed(0)
    B, H, N, d = 1, 1, 5, 16
    q, k, v = make_qkv(B, H, N, d, torch.float32, DEVICE, requires_grad=True, seed=3)
    lam = torch.tensor(0.6, device=DEVICE, requires_grad=True)
    w = (1 + 0.3 * torch.randn(2 * d)).to(DEVICE).requires_grad_(True)
    leaves = [q, k, v, lam, w]
    dout = torch.randn(B, H, N, 2 * d).to(DEVICE)
    ours = _grads(diff_attn, leaves, dict(causal=True, out_scale=0.2), dout)

    def f(*xs):
        return (diff_attn_reference(*xs[:4], norm_weight=xs[4], causal=True, out_scale=0.2) * dout.double()).sum()

    x64 = [to64(x) for x in leaves]
    eps = 1e-6
    for i, x in enumerate(x64):
        flat = x.detach().reshape(-1)
        fd = torch.empty_like(flat)
        for j in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[j] = eps
            plus = [y.detach() if t != i else (flat + e).view_as(x) for t, y in enumerate(x64)]
            minus = [y.detach() if t != i else (flat - e).view_as(x) for t, y in enumerate(x64)]
            fd[j] = (f(*plus) - f(*minus)) / (2 * eps)
        torch.testing.assert_close(ours[i].double().reshape(-1), fd, atol=1e-4, rtol=1e-4)


def test_feature_dim_strides_forward_and_backward(poison):
    """Inputs whose head dim is not the innermost (stride_d != 1): no copy is made and results stay exact."""
    B, H, N, d = 1, 2, 37, 32
    g = torch.Generator().manual_seed(11)
    q = torch.randn(B, 2 * H, d, N, generator=g).to(DEVICE).transpose(-1, -2).requires_grad_()
    k = torch.randn(B, 2 * H, d, N, generator=g).to(DEVICE).transpose(-1, -2).requires_grad_()
    v = torch.randn(B, H, 2 * d, N, generator=g).to(DEVICE).transpose(-1, -2).requires_grad_()
    assert q.stride(-1) == N
    leaves = [q, k, v, torch.tensor(0.7, device=DEVICE, requires_grad=True)]
    dout = torch.randn(B, H, N, 2 * d, generator=g).to(DEVICE)
    kw = dict(causal=True, out_scale=1.0)
    ours = _grads(diff_attn, leaves, kw, dout)
    ref = _grads(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double())
    for a, b, name in zip(ours, ref, ["dq", "dk", "dv", "dlam"]):
        assert_close(a, b, torch.float32, BWD, name)
    out = diff_attn(q, k, v, 0.7, causal=True)
    assert_close(out, diff_attn_reference(to64(q), to64(k), to64(v), 0.7, causal=True), torch.float32,
                 FWD, "out")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow notes from the interpreter, by design
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_very_negative_scores_keep_gradients_finite(causal, poison):
    """All scores near -120: a zero-padded key past N would score 0 and get p = exp(120), which overflows fp32;
    the sequence tail must stay masked in the dQ kernel (inf·0 = NaN otherwise). Key rows past N in the dK/dV
    kernel may hold anything: they are never stored."""
    B, H, N, d = 1, 1, 45, 16
    g = torch.Generator().manual_seed(5)
    base = torch.ones(B, 2 * H, N, d)
    q = (2 * base + 0.1 * torch.randn(B, 2 * H, N, d, generator=g)).to(DEVICE).requires_grad_()
    k = (-3.75 * base + 0.1 * torch.randn(B, 2 * H, N, d, generator=g)).to(DEVICE).requires_grad_()
    v = torch.randn(B, H, N, 2 * d, generator=g).to(DEVICE).requires_grad_()
    leaves = [q, k, v, torch.tensor(0.5, device=DEVICE, requires_grad=True)]
    dout = torch.randn(B, H, N, 2 * d, generator=g).to(DEVICE)
    kw = dict(causal=causal, scale=1.0)
    ours = _grads(diff_attn, leaves, kw, dout)
    ref = _grads(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double())
    # Scores of magnitude 120 carry fp32 round-off of ~1e-5 into p, so the bound is relative to PyTorch's own
    # fp32 error on the same inputs (the flash-attention idiom), not the fixed fp32 tolerance.
    torch_fp32 = _grads(diff_attn_reference, leaves, kw, dout)
    for a, b, c, name in zip(ours, ref, torch_fp32, ["dq", "dk", "dv", "dlam"]):
        assert torch.isfinite(a).all(), name
        assert_close_lowp(a, b, c, name)
