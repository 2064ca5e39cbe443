"""`kernels.diff_attn_varlen` (forward and backward) vs a float64 evaluation of its reference, on fresh random
packed batches: ragged lengths with empty and one-token sequences, GQA ratios 1/2/4/8, d = 64 and 128, causal
(bottom-right, also where a sequence has fewer keys than queries) and not. Sizes are tiny: the interpreter is slow.
"""

import pytest
import torch
from conftest import DEVICE
from tolerances import BWD, FWD, assert_close, assert_close_lowp

from kernels import diff_attn_varlen, diff_attn_varlen_reference

DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
# (q lengths, k lengths): self-attention with empty/one-token sequences; a KV prefix (chunked prefill); fewer keys
# than queries in one sequence (its first causal rows see nothing and output 0).
LENGTHS = {
    "self-0-1-19-5": ([0, 1, 19, 5], [0, 1, 19, 5]),
    "prefix-3-1-9": ([3, 1, 9], [20, 1, 33]),
    "fewer-keys-7-4": ([7, 4], [3, 4]),
}
# (H, Hkv, d): GQA ratios 1, 2, 4, 8 across d = 64 and 128
HEADS = [(2, 2, 64), (4, 2, 128), (4, 1, 64), (8, 1, 64), (8, 2, 128)]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _inputs(lens_q, lens_k, H, Hkv, d, dtype, lam_kind, norm, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)

    def rnd(*shape):
        x = torch.randn(*shape, generator=g).to(DEVICE, dtype)
        return x.requires_grad_(requires_grad)

    q, k, v = rnd(tq, 2 * H, d), rnd(tk, 2 * Hkv, d), rnd(tk, Hkv, 2 * d)
    # λ kept away from 1: with one or two visible keys P1 ≈ P2 and o = (1 − λ)·V cancels, which the norm epilogue
    # then scales up, rounding error included (an ill-conditioned input, not a kernel error).
    lam = {"float": 0.6, "head": 0.2 + 0.05 * torch.arange(H, dtype=torch.float32),
           "token": 0.2 + 0.5 * torch.rand(tq, H, generator=g), "scalar": torch.tensor(-0.2)}[lam_kind]
    if isinstance(lam, torch.Tensor):
        lam = lam.to(DEVICE).requires_grad_(requires_grad)
    w = (1 + 0.5 * torch.randn(2 * d, generator=g)).to(DEVICE).requires_grad_(requires_grad) if norm else None
    kw = dict(norm_weight=w, out_scale=0.3 if norm else 0.7)
    return q, k, v, lam, kw, (_cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k))


def _to64(x):
    return x.detach().double().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x


def _cases():
    out, kinds = [], ["float", "head", "token", "scalar"]
    for i, (name, (lq, lk)) in enumerate(LENGTHS.items()):
        for j, (H, Hkv, d) in enumerate(HEADS):
            causal = (i + j) % 2 == 0
            kind, norm = kinds[(i + j) % 4], j % 2 == 1
            cid = f"{name}-H{H}-Hkv{Hkv}-d{d}{'-causal' if causal else ''}-lam_{kind}{'-norm' if norm else ''}"
            out.append(pytest.param(lq, lk, H, Hkv, d, causal, kind, norm, id=cid))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("lens_q,lens_k,H,Hkv,d,causal,kind,norm", _cases())
def test_varlen_forward_matches_float64_reference(lens_q, lens_k, H, Hkv, d, causal, kind, norm, dtype, poison):
    q, k, v, lam, kw, cu = _inputs(lens_q, lens_k, H, Hkv, d, dtype, kind, norm)
    out = diff_attn_varlen(q, k, v, lam, *cu, causal=causal, **kw)
    assert out.shape == (sum(lens_q), H, 2 * d) and out.dtype == dtype
    ref = diff_attn_varlen_reference(_to64(q), _to64(k), _to64(v), _to64(lam), *cu, causal=causal,
                                     norm_weight=_to64(kw["norm_weight"]), out_scale=kw["out_scale"])
    if dtype == torch.bfloat16:  # GPU only: the flash-attention idiom against PyTorch's own bf16 error
        lowp = diff_attn_varlen_reference(q, k, v, lam, *cu, causal=causal, **kw)
        assert_close_lowp(out, ref, lowp, "varlen out")
    else:
        assert_close(out, ref, dtype, FWD, f"varlen out {tuple(out.shape)}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_rows_without_keys_are_zero(causal, poison):
    """A sequence with keys but no queries, one with queries but no keys: no NaN, zeros where nothing is seen."""
    q, k, v, lam, kw, cu = _inputs([0, 3, 2], [4, 0, 2], 2, 1, 64, torch.float32, "float", False)
    out = diff_attn_varlen(q, k, v, lam, *cu, causal=causal)
    assert torch.isfinite(out).all()
    assert (out[:3] == 0).all()


GRAD_CASES = [
    pytest.param([0, 1, 13, 6], [0, 1, 13, 6], 2, 2, 64, True, "token", True, id="self-0-1-13-6-H2-Hkv2-d64-causal"
                 "-lam_token-norm"),
    pytest.param([5, 9], [12, 9], 4, 2, 128, False, "head", False, id="prefix-5-9-H4-Hkv2-d128-lam_head"),
    pytest.param([7, 4, 0], [3, 20, 2], 8, 2, 64, True, "scalar", False, id="ragged-7-4-0-H8-Hkv2-d64-causal"
                 "-lam_scalar"),
    pytest.param([6, 3], [6, 3], 8, 1, 64, False, "token", True, id="self-6-3-H8-Hkv1-d64-lam_token-norm"),
]


def _grads(fn, q, k, v, lam, kw, cu, causal, dout):
    leaves = [t for t in (q, k, v, lam, kw["norm_weight"]) if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(q, k, v, lam, *cu, causal=causal, **kw)
    return leaves, torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("lens_q,lens_k,H,Hkv,d,causal,kind,norm", GRAD_CASES)
def test_varlen_gradients_match_float64_reference(lens_q, lens_k, H, Hkv, d, causal, kind, norm, dtype, poison):
    q, k, v, lam, kw, cu = _inputs(lens_q, lens_k, H, Hkv, d, dtype, kind, norm, requires_grad=True)
    dout = torch.randn(sum(lens_q), H, 2 * d, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    leaves, grads = _grads(diff_attn_varlen, q, k, v, lam, kw, cu, causal, dout)
    kw64 = dict(kw, norm_weight=_to64(kw["norm_weight"]))
    _, ref = _grads(diff_attn_varlen_reference, _to64(q), _to64(k), _to64(v), _to64(lam), kw64, cu, causal,
                    dout.double())
    lowp = (_grads(diff_attn_varlen_reference, q, k, v, lam, kw, cu, causal, dout)[1]
            if dtype == torch.bfloat16 else [None] * len(grads))
    names = ["dq", "dk", "dv", "dlam", "dnorm_weight"]
    for name, leaf, got, want, low in zip(names, leaves, grads, ref, lowp):
        assert got.shape == leaf.shape, name
        if low is not None:
            assert_close_lowp(got, want, low, name)
            continue
        # λ and the norm weight are fp32 leaves: their gradients are sums over many rows, checked at the
        # inputs' tolerance (as the dense backward's tests do).
        assert_close(got, want, dtype, BWD, f"{name} {tuple(got.shape)}")


def test_varlen_gqa_backward_is_deterministic(poison):
    q, k, v, lam, kw, cu = _inputs([9, 0, 14], [9, 0, 14], 8, 2, 64, torch.float16, "token", False,
                                   requires_grad=True)
    dout = torch.randn(23, 8, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    first = _grads(diff_attn_varlen, q, k, v, lam, kw, cu, True, dout)[1]
    second = _grads(diff_attn_varlen, q, k, v, lam, kw, cu, True, dout)[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _bad(**over):
    q, k, v, lam, kw, (cq, ck, mq, mk) = _inputs([3, 2], [3, 2], 2, 1, 64, torch.float32, "float", False)
    args = dict(q=q, k=k, v=v, lam=lam, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk)
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,needle", [
    (dict(cu_seqlens_q=torch.tensor([0, 3, 5])), TypeError, "cu_seqlens_q must be an int32"),
    (dict(cu_seqlens_k=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "cu_seqlens_k must have shape (3,)"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 3], dtype=torch.int32)), ValueError, "end at the total token count"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 3, 5], dtype=torch.int32)), ValueError, "cu_seqlens_k must have shape"),
    (dict(max_seqlen_q=2), ValueError, "max_seqlen_q=2 is smaller"),
    (dict(max_seqlen_k=3.0), TypeError, "max_seqlen_k must be an int"),
    (dict(v=torch.zeros(5, 2, 128)), ValueError, "v must have 1 heads"),
    (dict(k=torch.zeros(5, 6, 64), v=torch.zeros(5, 3, 128)), ValueError, "multiple of k's 3 groups"),
    (dict(lam=torch.zeros(4, 2)), ValueError, "(total_q, H)=(5, 2)"),
    (dict(q=torch.zeros(5, 4, 64, dtype=torch.float64)), TypeError, "must share one dtype"),
], ids=["cu-int64", "cu-k-length", "cu-not-monotone", "cu-k-too-long", "max-seqlen-small", "max-seqlen-float",
        "v-heads", "gqa-ratio", "lam-shape", "dtype-mismatch"])
def test_varlen_bad_arguments_name_the_argument(over, exc, needle):
    with pytest.raises(exc) as info:
        diff_attn_varlen(**_bad(**over))
    assert needle in str(info.value)


def test_varlen_non_monotone_cu_seqlens_rejected():
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        diff_attn_varlen(**_bad(cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32), max_seqlen_q=6))


def test_varlen_reads_strided_views_in_place(poison):
    """q, k, v as views of one packed projection output (T, 2H·d + 2Hkv·d + Hkv·2d), the layout a fused qkv linear
    gives: same bits as contiguous copies (the kernel takes the strides, nothing is copied)."""
    H, Hkv, d, lens = 4, 2, 64, [5, 0, 11]
    T = sum(lens)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, 2 * H * d + 4 * Hkv * d, generator=g).to(DEVICE, torch.float16)
    q = qkv[:, :2 * H * d].view(T, 2 * H, d)
    k = qkv[:, 2 * H * d:2 * H * d + 2 * Hkv * d].view(T, 2 * Hkv, d)
    v = qkv[:, 2 * H * d + 2 * Hkv * d:].view(T, Hkv, 2 * d)
    cu = _cu(lens)
    strided = diff_attn_varlen(q, k, v, 0.6, cu, cu, 11, 11, causal=True)
    dense = diff_attn_varlen(q.contiguous(), k.contiguous(), v.contiguous(), 0.6, cu, cu, 11, 11, causal=True)
    assert torch.equal(strided, dense)


def test_varlen_token_stride_past_2_pow_22_is_refused():
    """The token stride enters the forward's 32-bit in-tile offsets (rows·stride): above 2^22 elements it is
    refused by name instead of wrapping."""
    q, k, v, lam, kw, (cq, ck, mq, mk) = _inputs([1, 1], [1, 1], 2, 1, 64, torch.float16, "float", False)
    q_wide = torch.zeros(2, 2**22 + 256, dtype=torch.float16, device=DEVICE)[:, :256].view(2, 4, 64)
    with pytest.raises(ValueError, match=r"q has strides .*strides of dims \(0, 2\) at most 2\^22"):
        diff_attn_varlen(q_wide, k, v, lam, cq, ck, mq, mk)
