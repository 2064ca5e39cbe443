"""`kernels.diff_attn_decode` (split-K FlashDecoding) vs a float64 evaluation of its reference, on fresh random
caches: ragged cache lengths (down to Nq, up to Nmax), GQA ratios 1/2/4/8, Nq = 1, 2, 4, d = 64 and 128, chunk
counts forced and automatic, fp32/fp16, poisoned outputs and partial buffers."""

import pytest
import torch
from conftest import DEVICE
from tolerances import FWD, assert_close, assert_close_lowp

from kernels import diff_attn_decode, diff_attn_decode_reference

DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def _inputs(B, H, Hkv, Nq, Nmax, d, lens, dtype, lam_kind, norm, seed=0, cache_pad=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q = rnd(B, 2 * H, Nq, d)
    # cache_pad: the caches are a slice of a longer buffer (a preallocated cache), read in place
    k_cache = rnd(B, 2 * Hkv, Nmax + cache_pad, d)[:, :, :Nmax]
    v_cache = rnd(B, Hkv, Nmax + cache_pad, 2 * d)[:, :, :Nmax]
    lam = {"float": 0.6, "head": 0.2 + 0.05 * torch.arange(H, dtype=torch.float32),
           "token": 0.2 + 0.5 * torch.rand(B, H, Nq, generator=g), "scalar": torch.tensor(-0.2)}[lam_kind]
    if isinstance(lam, torch.Tensor):
        lam = lam.to(DEVICE)
    w = (1 + 0.5 * torch.randn(2 * d, generator=g)).to(DEVICE) if norm else None
    lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, lam, lens, dict(norm_weight=w, out_scale=0.3 if norm else 1.0)


def _to64(x):
    return x.double() if isinstance(x, torch.Tensor) else x


CASES = [
    # B, H, Hkv, Nq, Nmax, d, cache lengths, num_splits, λ kind, norm
    (3, 2, 2, 1, 70, 64, [1, 37, 70], None, "float", False),
    (2, 4, 2, 1, 90, 128, [90, 45], 3, "head", True),
    (2, 4, 1, 2, 64, 64, [2, 64], 4, "token", False),
    (1, 8, 1, 1, 100, 64, [77], 5, "scalar", True),
    (2, 8, 2, 4, 40, 128, [4, 33], None, "token", True),
    (2, 4, 4, 2, 33, 64, [33, 17], 1, "head", False),
]


def _cid(c):
    B, H, Hkv, Nq, Nmax, d, lens, splits, kind, norm = c
    return (f"B{B}-H{H}-Hkv{Hkv}-Nq{Nq}-Nmax{Nmax}-d{d}-lens{'_'.join(map(str, lens))}-splits{splits or 'auto'}"
            f"-lam_{kind}{'-norm' if norm else ''}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", [pytest.param(c, id=_cid(c)) for c in CASES])
def test_decode_matches_float64_reference(case, dtype, poison):
    B, H, Hkv, Nq, Nmax, d, lens, splits, kind, norm = case
    q, kc, vc, lam, cs, kw = _inputs(B, H, Hkv, Nq, Nmax, d, lens, dtype, kind, norm, cache_pad=5)
    out = diff_attn_decode(q, kc, vc, lam, cache_seqlens=cs, num_splits=splits, **kw)
    assert out.shape == (B, H, Nq, 2 * d) and out.dtype == dtype
    ref = diff_attn_decode_reference(_to64(q), _to64(kc), _to64(vc), _to64(lam), cache_seqlens=cs,
                                     norm_weight=_to64(kw["norm_weight"]), out_scale=kw["out_scale"])
    if dtype == torch.bfloat16:  # GPU only: the flash-attention idiom against PyTorch's own bf16 error
        lowp = diff_attn_decode_reference(q, kc, vc, lam, cache_seqlens=cs, **kw)
        assert_close_lowp(out, ref, lowp, "decode out")
    else:
        assert_close(out, ref, dtype, FWD, f"decode out {tuple(out.shape)}")


def test_decode_chunk_count_does_not_change_the_result(poison):
    """The log-sum-exp combine is exact: 1, 2 and 7 chunks agree to fp32 rounding."""
    q, kc, vc, lam, cs, kw = _inputs(2, 4, 2, 1, 120, 64, [120, 61], torch.float32, "token", True)
    outs = [diff_attn_decode(q, kc, vc, lam, cache_seqlens=cs, num_splits=s, **kw) for s in (1, 2, 7)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], **FWD[torch.float32])


def test_decode_equals_last_rows_of_causal_prefill(poison):
    """Decoding the last Nq tokens of a full cache is the last Nq rows of causal attention over the sequence."""
    from kernels import diff_attn_reference

    q, kc, vc, lam, cs, kw = _inputs(1, 2, 2, 3, 21, 64, [21], torch.float32, "float", False)
    g = torch.Generator().manual_seed(4)
    q_all = torch.randn(1, 4, 21, 64, generator=g).to(DEVICE)
    q_all[:, :, -3:] = q
    full = diff_attn_reference(q_all.double(), kc.double(), vc.double(), 0.6, causal=True)
    out = diff_attn_decode(q, kc, vc, 0.6, cache_seqlens=cs, num_splits=2)
    assert_close(out, full[:, :, -3:], torch.float32, FWD, "decode vs prefill rows")


RANGE_ERROR = "cache_seqlens must lie in [Nq, Nmax] = [2, 40]"


@pytest.mark.parametrize("over,exc,needle", [
    (dict(cache_seqlens=torch.tensor([5, 9])), TypeError, "cache_seqlens must be an int32"),
    (dict(cache_seqlens=torch.tensor([5], dtype=torch.int32)), ValueError, "cache_seqlens must have shape (2,)"),
    (dict(cache_seqlens=torch.tensor([5, 41], dtype=torch.int32)), ValueError, RANGE_ERROR),
    (dict(cache_seqlens=torch.tensor([1, 9], dtype=torch.int32)), ValueError, RANGE_ERROR),
    (dict(num_splits=0), ValueError, "num_splits must be None or an int >= 1"),
    (dict(v_cache=torch.zeros(2, 1, 41, 128)), ValueError, "one length Nmax"),
    (dict(lam=torch.zeros(3)), ValueError, "lam must be"),
], ids=["seqlens-int64", "seqlens-shape", "seqlens-past-cache", "seqlens-below-nq", "splits-zero",
        "cache-lengths", "lam-shape"])
def test_decode_bad_arguments_name_the_argument(over, exc, needle):
    q, kc, vc, lam, cs, kw = _inputs(2, 2, 1, 2, 40, 64, [5, 9], torch.float32, "float", False)
    args = dict(q=q, k_cache=kc, v_cache=vc, lam=lam, cache_seqlens=cs)
    args.update(over)
    with pytest.raises(exc) as info:
        diff_attn_decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("lam"), **args)
    assert needle in str(info.value)
