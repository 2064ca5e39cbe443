"""`kernels.diff_attn_decode`'s head_layout="halves" (transformers' DiffLlama) and cache_leftpad (left-padded
Hugging Face batches) vs a float64 evaluation of the reference on the interleaved rewrite of the same inputs: GQA
ratios 1/2/4, ragged left padding (down to an empty valid range, and pads among the new queries), Nq = 1 and 3,
one and several chunks, fp32/fp16, d = 64 and 128; the padding is never read; bad arguments name themselves."""

import pytest
import torch
from conftest import DEVICE
from tolerances import FWD, assert_close, assert_close_lowp

from kernels import diff_attn_decode, diff_attn_decode_reference
from kernels.reference_lm import halves_to_interleaved

DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]


def _inputs(B, H, Hkv, Nq, Nmax, d, lens, pads, layout, dtype, norm, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    q = rnd(B, 2 * H, Nq, d)
    # A slice of a longer preallocated cache, read in place (strides, not shapes, say where the heads are).
    k_cache = rnd(B, 2 * Hkv, Nmax + 3, d)[:, :, :Nmax]
    v_cache = (rnd(B, 2 * Hkv, Nmax + 3, d) if layout == "halves" else rnd(B, Hkv, Nmax + 3, 2 * d))[:, :, :Nmax]
    lam = (0.2 + 0.5 * torch.rand(B, H, Nq, generator=g)).to(DEVICE)
    w = (1 + 0.5 * torch.randn(2 * d, generator=g)).to(DEVICE) if norm else None
    i32 = dict(dtype=torch.int32, device=DEVICE)
    lp = torch.tensor(pads, **i32) if pads is not None else None
    return q, k_cache, v_cache, lam, torch.tensor(lens, **i32), lp, dict(norm_weight=w, out_scale=0.3 if norm else 1.0)


CASES = [
    # B, H, Hkv, Nq, Nmax, d, cache lengths, left pads, num_splits, layout, norm
    (3, 2, 2, 1, 70, 64, [70, 37, 5], [0, 20, 5], None, "halves", False),  # the last: empty valid range
    (2, 4, 2, 3, 90, 128, [90, 45], [33, 44], 3, "halves", True),  # 44 > 45 - 3: two new queries are pads
    (2, 4, 1, 1, 64, 64, [64, 50], [17, 0], 4, "interleaved", False),
    (2, 8, 2, 3, 40, 64, [40, 33], [1, 30], 1, "halves", True),
    (1, 4, 4, 1, 100, 128, [77], None, 5, "halves", False),
]


def _cid(c):
    B, H, Hkv, Nq, Nmax, d, lens, pads, splits, layout, norm = c
    pad = "_".join(map(str, pads)) if pads is not None else "none"
    return (f"{layout}-B{B}-H{H}-Hkv{Hkv}-Nq{Nq}-Nmax{Nmax}-d{d}-lens{'_'.join(map(str, lens))}-pads{pad}"
            f"-splits{splits or 'auto'}{'-norm' if norm else ''}")


def _reference64(q, kc, vc, lam, lens, lp, kw, layout):
    """The reference on the interleaved rewrite (float64): the halves layout is checked against the one
    interleaved math, not against its own conversion inside the reference."""
    if layout == "halves":
        q, kc, vc = halves_to_interleaved(q, kc, vc)
    w = kw["norm_weight"]
    return diff_attn_decode_reference(q.double(), kc.double(), vc.double(), lam.double(), cache_seqlens=lens,
                                      cache_leftpad=lp, norm_weight=w.double() if w is not None else None,
                                      out_scale=kw["out_scale"])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", [pytest.param(c, id=_cid(c)) for c in CASES])
def test_decode_layout_and_leftpad_match_float64_reference(case, dtype, poison):
    B, H, Hkv, Nq, Nmax, d, lens, pads, splits, layout, norm = case
    q, kc, vc, lam, cs, lp, kw = _inputs(B, H, Hkv, Nq, Nmax, d, lens, pads, layout, dtype, norm)
    out = diff_attn_decode(q, kc, vc, lam, cache_seqlens=cs, cache_leftpad=lp, head_layout=layout,
                           num_splits=splits, **kw)
    assert out.shape == (B, H, Nq, 2 * d) and out.dtype == dtype
    ref = _reference64(q, kc, vc, lam, cs, lp, kw, layout)
    if dtype == torch.bfloat16:  # GPU only: the flash-attention idiom against PyTorch's own bf16 error
        lowp = diff_attn_decode_reference(q, kc, vc, lam, cache_seqlens=cs, cache_leftpad=lp, head_layout=layout,
                                          **kw)
        assert_close_lowp(out, ref, lowp, "decode out")
    else:
        assert_close(out, ref, dtype, FWD, f"decode {layout} out {tuple(out.shape)}")
    for b, (n, p) in enumerate(zip(lens, pads or [0] * B)):  # new queries before the padding's end: exactly 0
        blind = max(0, min(Nq, p - (n - Nq)))
        assert (out[b, :, :blind] == 0).all(), f"sequence {b}: its first {blind} new queries see no key"


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_decode_never_reads_the_padding_or_past_the_length(layout, poison):
    """NaN in the left padding and past cache_seqlens: a read (even masked afterwards) would turn the output NaN."""
    lens, pads = [60, 41], [23, 9]
    q, kc, vc, lam, cs, lp, kw = _inputs(2, 4, 2, 1, 64, 64, lens, pads, layout, torch.float32, False)
    ref = _reference64(q, kc, vc, lam, cs, lp, kw, layout)
    for b, (n, p) in enumerate(zip(lens, pads)):
        for cache in (kc, vc):
            cache[b, :, :p] = float("nan")
            cache[b, :, n:] = float("nan")
    for splits in (1, 3):
        out = diff_attn_decode(q, kc, vc, lam, cache_seqlens=cs, cache_leftpad=lp, head_layout=layout,
                               num_splits=splits)
        assert_close(out, ref, torch.float32, FWD, f"decode {layout} splits={splits}")


def test_decode_halves_is_the_interleaved_kernel_on_rewritten_heads(poison):
    """Both layouts run the same kernel through different strides: the same inputs rewritten agree to rounding."""
    q, kc, vc, lam, cs, lp, kw = _inputs(2, 4, 2, 3, 50, 64, [50, 20], [4, 0], "halves", torch.float32, True)
    out = diff_attn_decode(q, kc, vc, lam, cache_seqlens=cs, cache_leftpad=lp, head_layout="halves", num_splits=2,
                           **kw)
    qi, ki, vi = halves_to_interleaved(q, kc, vc)
    want = diff_attn_decode(qi, ki, vi, lam, cache_seqlens=cs, cache_leftpad=lp, num_splits=2, **kw)
    torch.testing.assert_close(out, want, **FWD[torch.float32])


LEFTPAD_RANGE = "cache_leftpad must lie in [0, cache_seqlens[b]]"


@pytest.mark.parametrize("over,exc,needle", [
    (dict(head_layout="llama"), ValueError, "head_layout must be one of ('interleaved', 'halves')"),
    (dict(head_layout=None), TypeError, "head_layout must be a str"),
    (dict(head_layout="interleaved"), ValueError, "v_cache must have 1 heads (half of k_cache's 2)"),
    (dict(v_cache=torch.zeros(2, 1, 40, 128)), ValueError, "v_cache must have 2 heads (as k_cache"),
    (dict(v_cache=torch.zeros(2, 2, 40, 128)), ValueError, "v_cache in d=64"),
    (dict(cache_leftpad=torch.tensor([0, 1])), TypeError, "cache_leftpad must be an int32"),
    (dict(cache_leftpad=torch.tensor([0], dtype=torch.int32)), ValueError, "cache_leftpad must have shape (2,)"),
    (dict(cache_leftpad=torch.tensor([0, 10], dtype=torch.int32)), ValueError, LEFTPAD_RANGE),
    (dict(cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32)), ValueError, LEFTPAD_RANGE),
    (dict(cache_leftpad=[0, 1]), TypeError, "cache_leftpad must be a torch.Tensor"),
], ids=["layout-unknown", "layout-not-str", "halves-cache-as-interleaved", "halves-v-heads", "halves-v-width",
        "leftpad-int64", "leftpad-shape", "leftpad-past-seqlens", "leftpad-negative", "leftpad-list"])
def test_decode_layout_and_leftpad_bad_arguments_name_the_argument(over, exc, needle):
    q, kc, vc, lam, cs, lp, kw = _inputs(2, 2, 1, 2, 40, 64, [5, 9], [0, 3], "halves", torch.float32, False)
    args = dict(q=q, k_cache=kc, v_cache=vc, lam=lam, cache_seqlens=cs, cache_leftpad=lp, head_layout="halves")
    args.update(over)
    with pytest.raises(exc) as info:
        diff_attn_decode(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("lam"), **args)
    assert needle in str(info.value)


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_decode_takes_caches_whose_head_stride_passes_2_pow_22(layout, poison):
    """A contiguous cache of Nmax·2d > 2^22 elements per head (Llama-like: 16k+ tokens at d = 128): head strides go
    into 64-bit bases, only the token and feature strides are 32-bit in-tile offsets. Short valid lengths keep the
    interpreter quick."""
    Nmax = 2**22 // 128 + 16
    q, kc, vc, lam, cs, lp, kw = _inputs(1, 2, 1, 1, Nmax, 128, [40], [3], layout, torch.float16, False)
    assert max(vc.stride()[:2]) > 2**22
    out = diff_attn_decode(q, kc, vc, lam, cache_seqlens=cs, cache_leftpad=lp, head_layout=layout, num_splits=1)
    ref = _reference64(q, kc[:, :, :40], vc[:, :, :40], lam, cs, lp, kw, layout)
    assert_close(out, ref, torch.float16, FWD, f"decode {layout} long cache")
