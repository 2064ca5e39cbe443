"""Forward kernel vs a float64 evaluation of the reference, on fresh random inputs.

The grid is a covering design, not a full product: every N x d x causal x dtype cell runs, and B, H, λ value,
λ kind, epilogue and input layout cycle across cells so that each of their values meets every N, d and dtype.
"""

import itertools
import math

import pytest
import torch
from cases import make_lam, make_qkv, to64
from conftest import DEVICE
from tolerances import FWD, assert_close, assert_close_lowp

from kernels import diff_attn, diff_attn_reference

NS = [1, 17, 77, 128, 197, 300]
DS = [16, 32, 64, 128]
LAMS = [0.0, -0.2, 0.8, 1.3]
LAM_KINDS = ["float", "head", "token", "scalar"]
LAYOUTS = ["contiguous", "linear", "fused"]
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def _cases():
    out = []
    for i, (N, d, causal) in enumerate(itertools.product(NS, DS, (False, True))):
        B, H = 1 + i % 2, (1, 3)[(i // 2) % 2]
        lam, kind = LAMS[(i // 3) % 4], LAM_KINDS[i % 4]
        norm, layout = (i // 2) % 2 == 0, LAYOUTS[i % 3]
        cid = f"B{B}-H{H}-N{N}-d{d}{'-causal' if causal else ''}-lam{lam}-{kind}{'-norm' if norm else ''}-{layout}"
        out.append(pytest.param(B, H, N, d, causal, lam, kind, norm, layout, id=cid))
    return out


def _run(B, H, N, d, causal, lam_value, kind, norm, layout, dtype, seed=0):
    q, k, v = make_qkv(B, H, N, d, dtype, DEVICE, layout, seed=seed)
    lam = make_lam(kind, lam_value, B, H, N, DEVICE)
    g = torch.Generator().manual_seed(seed + 7)
    w = (1 + 0.5 * torch.randn(2 * d, generator=g)).to(DEVICE) if norm else None
    kw = dict(causal=causal, norm_weight=w, out_scale=0.2 if norm else 1.0)
    return (q, k, v, lam, kw), diff_attn(q, k, v, lam, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("B,H,N,d,causal,lam,kind,norm,layout", _cases())
def test_forward_matches_float64_reference(B, H, N, d, causal, lam, kind, norm, layout, dtype, poison):
    (q, k, v, lam_t, kw), out = _run(B, H, N, d, causal, lam, kind, norm, layout, dtype)
    assert out.shape == (B, H, N, 2 * d) and out.dtype == dtype
    kw64 = dict(kw, norm_weight=to64(kw["norm_weight"]))
    ref = diff_attn_reference(to64(q), to64(k), to64(v), to64(lam_t), **kw64)
    what = f"out {tuple(out.shape)}"
    if dtype == torch.bfloat16:
        lowp = diff_attn_reference(q, k, v, lam_t, **kw)
        assert_close_lowp(out, ref, lowp, what)
    else:
        assert_close(out, ref, dtype, FWD, what)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_is_deterministic(causal, poison):
    args, first = _run(2, 3, 197, 64, causal, 0.8, "token", True, "linear", torch.float16)
    q, k, v, lam, kw = args
    second = diff_attn(q, k, v, lam, **kw)
    assert torch.equal(first, second)


def test_output_is_view_of_token_major_buffer(poison):
    """The model's transpose(1, 2).reshape(B, N, H·2d) must cost nothing."""
    (q, k, v, lam, kw), out = _run(2, 3, 77, 32, False, 0.8, "float", False, "linear", torch.float32)
    flat = out.transpose(1, 2).reshape(2, 77, 3 * 64)
    assert flat.data_ptr() == out.data_ptr() and flat.is_contiguous()


def test_lse_and_o2_saved_for_backward(poison):
    """The forward's saved state: per-row LSE of both maps (log2 domain: lse = log2(Σ exp(s)) = logsumexp(s)·log2 e)
    and O2, checked directly."""
    from kernels.fwd import diff_attn_fwd

    B, H, N, d = 1, 2, 77, 32
    q, k, v = make_qkv(B, H, N, d, torch.float32, DEVICE, "linear")
    lam = torch.full((B, H, N), 0.7, device=DEVICE)
    out, lse, o2, o_pre = diff_attn_fwd(q, k, v, lam, None, causal=True, scale=d**-0.5, norm_eps=1e-5,
                                        out_scale=1.0, save_for_bwd=True)
    assert o_pre is None
    s = (q.double() @ k.double().transpose(-1, -2)) * d**-0.5
    s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / math.log(2), atol=1e-5, rtol=1e-5)
    o2_ref = torch.softmax(s, -1).view(B, H, 2, N, N)[:, :, 1] @ v.double()
    assert_close(o2, o2_ref, torch.float32, FWD, "o2")


def test_lambda_zero_is_plain_attention(poison):
    """λ = 0 must reduce to softmax(s·Q1K1ᵀ)V exactly as PyTorch's SDPA computes it (nothing divides by λ)."""
    B, H, N, d = 1, 2, 77, 64
    q, k, v = make_qkv(B, H, N, d, torch.float32, DEVICE)
    out = diff_attn(q, k, v, 0.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, 0::2].double(), k[:, 0::2].double(), v.double())
    assert_close(out, sdpa, torch.float32, FWD, "lam=0")


def test_no_grad_writes_nothing_extra(poison):
    from kernels.fwd import diff_attn_fwd

    q, k, v = make_qkv(1, 1, 17, 16, torch.float32, DEVICE)
    lam = torch.zeros(1, 1, 17, device=DEVICE)
    _, lse, o2, o_pre = diff_attn_fwd(q, k, v, lam, None, causal=False, scale=0.25, norm_eps=1e-5, out_scale=1.0,
                                      save_for_bwd=False)
    assert lse is None and o2 is None and o_pre is None


@pytest.mark.parametrize("B,N", [(0, 5), (2, 0)], ids=["B0", "N0"])
def test_empty_input_returns_empty(B, N):
    q, k = torch.randn(B, 2, N, 16, device=DEVICE), torch.randn(B, 2, N, 16, device=DEVICE)
    v = torch.randn(B, 1, N, 32, device=DEVICE)
    out = diff_attn(q, k, v, 0.5)
    assert out.shape == (B, 1, N, 32)


@pytest.mark.parametrize("layout,kv_heads,v_shape,width", [("interleaved", 2, (1, 1, 4, 32), 32),
                                                           ("halves", 2, (1, 2, 4, 16), 32),
                                                           ("v2", 1, (1, 1, 4, 16), 16)],
                         ids=["interleaved", "halves", "v2"])
def test_zero_query_heads_launch_nothing(layout, kv_heads, v_shape, width, monkeypatch):
    """q with 0 heads against a key/value group passes the H % Hkv check (0 % Hkv == 0); nothing may launch (the
    backward's group count would be 0 and its programs divide by it): an empty (B, 0, N, w) output."""
    import kernels.ops

    monkeypatch.setattr(kernels.ops, "diff_attn_fwd", lambda *a, **k: pytest.fail("a kernel was launched"))
    q = torch.randn(1, 0, 4, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(1, kv_heads, 4, 16, device=DEVICE, requires_grad=True)
    v = torch.randn(*v_shape, device=DEVICE, requires_grad=True)
    out = diff_attn(q, k, v, 0.5, head_layout=layout)
    assert out.shape == (1, 0, 4, width)


def test_inference_under_no_grad_saves_nothing(monkeypatch, poison):
    """Trainable inputs (a model's norm weight) under torch.no_grad(): the forward writes no backward state."""
    import kernels.ops

    seen = []
    real = kernels.ops.diff_attn_fwd

    def spy(*args, **kwargs):
        seen.append(kwargs["save_for_bwd"])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.ops, "diff_attn_fwd", spy)
    q, k, v = make_qkv(1, 1, 17, 16, torch.float32, DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        out = diff_attn(q, k, v, 0.5, norm_weight=w)
    assert seen == [False] and out.grad_fn is None
    diff_attn(q, k, v, 0.5, norm_weight=w)
    assert seen == [False, True]
