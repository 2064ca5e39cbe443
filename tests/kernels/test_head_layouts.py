"""The head layouts of the dense `kernels.diff_attn` (`head_layout`): "halves" (transformers' DiffLlama: query heads
h and h+H, key heads g and g+Hkv, value cat(v[g], v[g+Hkv])) and "v2" (Diff Transformer V2: both maps read one key
head and one d-wide value head), with GQA, vs a float64 evaluation of the reference on fresh random inputs, outputs
poisoned; gradients of q, k, v, λ and the norm weight in every backward form; the torch.library ops under
torch.compile; and the errors for shapes that do not fit the layout.
"""

import pytest
import torch
from cases import call_with_leaves, grads_of, make_lam, make_layout_qkv, to64
from conftest import DEVICE
from tolerances import BWD, BWD_ROW_SUMS, FWD, assert_close, assert_close_lowp

import kernels
from kernels import diff_attn, diff_attn_reference

DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
NAMES = ["dq", "dk", "dv", "dlam", "dnorm_weight"]
# (layout, H, Hkv, N, d, causal, norm)
CELLS = [
    ("halves", 4, 2, 77, 64, True, True),
    ("halves", 4, 4, 1, 128, False, False),
    ("halves", 4, 1, 197, 64, False, True),
    ("v2", 4, 2, 77, 64, True, True),
    ("v2", 4, 4, 197, 64, False, False),
    ("v2", 4, 1, 33, 128, True, True),
]


def _id(layout, H, hkv, N, d, causal, norm):
    return f"{layout}-B1-H{H}-Hkv{hkv}-N{N}-d{d}{'-causal' if causal else ''}{'-norm' if norm else ''}"


CASES = [pytest.param(*c, id=_id(*c)) for c in CELLS]


def _inputs(layout, H, hkv, N, d, causal, norm, dtype, seed=0):
    q, k, v = make_layout_qkv(1, H, hkv, N, d, dtype, DEVICE, layout, requires_grad=True, seed=seed,
                              token_major=seed % 2 == 1)
    lam = make_lam("token", 0.5, 1, H, N, DEVICE, requires_grad=True)
    width = d if layout == "v2" else 2 * d
    w = None
    if norm:
        w = (1 + 0.5 * torch.randn(width, generator=torch.Generator().manual_seed(seed + 2))).to(DEVICE)
        w.requires_grad_(True)
    dout = torch.randn(1, H, N, width, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    leaves = [q, k, v, lam] + ([w] if norm else [])
    return leaves, dict(causal=causal, out_scale=0.5 if norm else 1.0, head_layout=layout), dout


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("layout,H,hkv,N,d,causal,norm", CASES)
def test_layout_forward_matches_float64_reference(layout, H, hkv, N, d, causal, norm, dtype, poison):
    leaves, kw, _ = _inputs(layout, H, hkv, N, d, causal, norm, dtype)
    with torch.no_grad():
        out = call_with_leaves(diff_attn, leaves, kw)
        ref = call_with_leaves(diff_attn_reference, [to64(x) for x in leaves], kw)
        assert out.shape == (1, H, N, d if layout == "v2" else 2 * d) and out.dtype == dtype
        if dtype == torch.bfloat16:
            assert_close_lowp(out, ref, call_with_leaves(diff_attn_reference, leaves, kw), "out")
        else:
            assert_close(out, ref, dtype, FWD, "out")


# Every cell in the separate form (fp32 and fp16 alternating); the one-launch forms on the GQA cells of each layout.
GRAD_CASES = [pytest.param("separate", *c, (torch.float32, torch.float16)[i % 2], id=f"separate-{_id(*c)}")
              for i, c in enumerate(CELLS)]
GRAD_CASES += [pytest.param(name, *CELLS[i], torch.float16 if name == "fused" else torch.float32,
                            id=f"{name}-{_id(*CELLS[i])}") for name in ("fused", "atomic") for i in (0, 5)]


@pytest.mark.parametrize("name,layout,H,hkv,N,d,causal,norm,dtype", GRAD_CASES)
def test_layout_gradients_match_float64_reference(name, layout, H, hkv, N, d, causal, norm, dtype, form, poison):
    form(name)
    leaves, kw, dout = _inputs(layout, H, hkv, N, d, causal, norm, dtype, seed=1)
    ours = grads_of(diff_attn, leaves, kw, dout)
    ref = grads_of(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double())
    for what, a, b, leaf in zip(NAMES, ours, ref, leaves):
        assert a.shape == leaf.shape, what
        table = BWD_ROW_SUMS if what in ("dlam", "dnorm_weight") else BWD
        assert_close(a, b, dtype, table, f"{name} {layout} {what}")


@pytest.mark.parametrize("layout", ["halves", "v2"])
def test_layout_key_value_gradients_are_bitwise_deterministic(layout, poison):
    leaves, kw, dout = _inputs(layout, 4, 2, 77, 64, True, True, torch.float16, seed=3)
    first = grads_of(diff_attn, leaves, kw, dout)
    second = grads_of(diff_attn, leaves, kw, dout)
    for what, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), what


def test_halves_is_diffllama_two_call_attention(poison):
    """transformers' DiffLlama computes one attention over `value` repeated per query head and the concatenation
    cat(value[j mod Hkv], value[j mod Hkv + Hkv]) per head, then takes the first and second half of the heads as
    the two maps. Written out here with SDPA (not through the shared reference)."""
    H, hkv, N, d = 4, 2, 37, 16
    q, k, v = make_layout_qkv(1, H, hkv, N, d, torch.float64, DEVICE, "halves", seed=7)
    lam = 0.6
    group = (2 * H) // (2 * hkv)
    k_rep = k.repeat_interleave(group, dim=1)  # query head i uses kv head i // group (transformers' repeat_kv)
    v_rep = v.repeat_interleave(group, dim=1)
    value = torch.cat([v_rep[:, : H], v_rep[:, H:]], dim=-1)  # (B, H, N, 2d)
    value = torch.cat([value, value], dim=1)  # the 2H query heads' values
    attn = torch.nn.functional.scaled_dot_product_attention(q, k_rep, value, is_causal=True)
    expected = attn[:, :H] - lam * attn[:, H:]
    out = diff_attn(q.float(), k.float(), v.float(), lam, causal=True, head_layout="halves")
    assert_close(out, expected, torch.float32, FWD, "halves vs DiffLlama")


def test_v2_matches_diff_attn_v2_reference(poison):
    q, k, v = make_layout_qkv(2, 4, 2, 45, 32, torch.float32, DEVICE, "v2", seed=9)
    lam = torch.rand(2, 4, 45, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out = diff_attn(q, k, v, lam, causal=True, head_layout="v2")
    ref = kernels.diff_attn_v2_reference(to64(q), to64(k), to64(v), to64(lam), causal=True)
    assert_close(out, ref, torch.float32, FWD, "v2")


@pytest.mark.parametrize("layout", ["interleaved", "halves", "v2"])
def test_compile_fullgraph_layouts(layout):
    """The layout travels through the torch.library ops as a constant: fake shapes (v2's d-wide output), forward
    and backward under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    leaves, kw, dout = _inputs(layout, 4, 2, 33, 16, True, True, torch.float32, seed=2)

    def loss(*xs):
        out = call_with_leaves(diff_attn, list(xs), kw)
        return out, (out * dout).sum()

    out, total = torch.compile(loss, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")(*leaves)
    grads = torch.autograd.grad(total, leaves)
    ref_leaves = [to64(x) for x in leaves]
    ref = call_with_leaves(diff_attn_reference, ref_leaves, kw)
    ref_grads = torch.autograd.grad((ref * dout.double()).sum(), ref_leaves)
    assert_close(out, ref, torch.float32, FWD, "out")
    for what, a, b in zip(NAMES, grads, ref_grads):
        assert a.shape == b.shape, what
        assert_close(a, b, torch.float32, BWD_ROW_SUMS if what in ("dlam", "dnorm_weight") else BWD, what)


B, H, N, d = 2, 4, 10, 16


def _t(*shape):
    return torch.randn(*shape, device=DEVICE)


BAD = [
    # (id, head_layout, q, k, v, kwargs, error, words the message must contain)
    ("unknown-layout", "blocked", (B, 2 * H, N, d), (B, 2 * H, N, d), (B, H, N, 2 * d), {}, ValueError,
     ["head_layout", "'blocked'", "interleaved"]),
    ("layout-not-str", 2, (B, 2 * H, N, d), (B, 2 * H, N, d), (B, H, N, 2 * d), {}, TypeError, ["head_layout", "str"]),
    ("hkv-not-divisor", "interleaved", (B, 2 * H, N, d), (B, 6, N, d), (B, 3, N, 2 * d), {}, ValueError,
     ["GQA", "H=4", "Hkv=3"]),
    ("hkv-too-many", "interleaved", (B, 2 * H, N, d), (B, 4 * H, N, d), (B, 2 * H, N, 2 * d), {}, ValueError,
     ["GQA", "multiple"]),
    ("k-odd-heads", "halves", (B, 2 * H, N, d), (B, 3, N, d), (B, 3, N, d), {}, ValueError, ["k", "even", "2Hkv"]),
    ("k-length", "v2", (B, 2 * H, N, d), (B, 2, N + 1, d), (B, 2, N, d), {}, ValueError,
     ["k", "shape", "(B, Hkv, N, d)"]),
    ("interleaved-v-for-halves", "halves", (B, 2 * H, N, d), (B, 4, N, d), (B, 2, N, 2 * d), {}, ValueError,
     ["v", "(B, 2Hkv, N, d)", "halves"]),
    ("halves-v-for-interleaved", "interleaved", (B, 2 * H, N, d), (B, 4, N, d), (B, 4, N, d), {}, ValueError,
     ["v", "(B, Hkv, N, 2d)"]),
    ("v-width-for-v2", "v2", (B, 2 * H, N, d), (B, 2, N, d), (B, 2, N, 2 * d), {}, ValueError,
     ["v", "(B, Hkv, N, d)", "v2"]),
    ("v2-norm-width", "v2", (B, 2 * H, N, d), (B, 2, N, d), (B, 2, N, d), dict(norm_weight=torch.ones(2 * d)),
     ValueError, ["norm_weight", "(d,)"]),
]


@pytest.mark.parametrize("fn", [diff_attn, diff_attn_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("layout,qs,ks,vs,kw,err,words", [pytest.param(*c[1:], id=c[0]) for c in BAD])
def test_bad_layout_inputs_raise_named_errors(fn, layout, qs, ks, vs, kw, err, words):
    with pytest.raises(err) as info:
        fn(_t(*qs), _t(*ks), _t(*vs), 0.5, head_layout=layout, **kw)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_halves_split_offset_past_int32_tiles_is_refused():
    """The distance between a halves value's two halves (Hkv·v.stride(1)) is part of a 32-bit in-tile offset:
    past 2^30 the kernel's validation refuses it, naming v (meta tensors: nothing is allocated); the reference,
    which has no such limit, accepts it."""
    from kernels.validate import check_diff_attn_args

    q = torch.empty(1, 4, 16, 16, device="meta")
    k = torch.empty(1, 4, 16, 16, device="meta")
    v = torch.empty(2**31 + 2**20, device="meta").as_strided((1, 4, 16, 16), (0, 2**29 + 2**10, 16, 1))
    kw = dict(causal=False, scale=None, norm_weight=None, norm_eps=1e-5, out_scale=1.0, head_layout="halves")
    with pytest.raises(ValueError, match="v has strides.*halves"):
        check_diff_attn_args(q, k, v, 0.5, for_kernel=True, **kw)
    assert check_diff_attn_args(q, k, v, 0.5, for_kernel=False, **kw).kv_heads == 2
    small = v.as_strided((1, 4, 16, 16), (0, 2**29 - 2**10, 16, 1))  # Hkv·stride(1) just below 2^30: accepted
    check_diff_attn_args(q, k, small, 0.5, for_kernel=True, **kw)


def test_value_split_flag_only_where_the_halves_are_apart():
    """V_SPLIT (the kernels address a value's two halves apart) is on for halves whose halves are not one strided
    run; adjacent halves (token-major MQA: v[g] and v[g+1] are neighbours) and the other layouts use the plain
    offsets. Both halves cases are exercised by the tests above (contiguous and token-major inputs)."""
    from kernels.layouts import value_split

    contiguous = make_layout_qkv(1, 4, 1, 8, 16, torch.float32, DEVICE, "halves")[2]
    token_major = make_layout_qkv(1, 4, 1, 8, 16, torch.float32, DEVICE, "halves", token_major=True)[2]
    token_major_gqa = make_layout_qkv(1, 4, 2, 8, 16, torch.float32, DEVICE, "halves", token_major=True)[2]
    assert value_split(contiguous, "halves", 1) and value_split(token_major_gqa, "halves", 2)
    assert not value_split(token_major, "halves", 1)
    for layout in ("interleaved", "v2"):
        assert not value_split(make_layout_qkv(1, 4, 2, 8, 16, torch.float32, DEVICE, layout)[2], layout, 2)


def test_norm_weight_stride_past_int32_offsets_is_refused_for_the_kernel():
    """The epilogue reads norm_weight at col·stride in 32-bit arithmetic: a stride past MAX_TILE_STRIDE is refused
    by the kernel's validation, naming norm_weight (meta tensors: nothing is allocated); the reference accepts it."""
    from kernels.validate import MAX_TILE_STRIDE, check_diff_attn_args

    q = torch.empty(1, 4, 16, 16, device="meta")
    k = torch.empty(1, 4, 16, 16, device="meta")
    v = torch.empty(1, 2, 16, 32, device="meta")
    w = torch.empty(32 * (MAX_TILE_STRIDE + 1), device="meta").as_strided((32,), (MAX_TILE_STRIDE + 1,))
    kw = dict(causal=False, scale=None, norm_weight=w, norm_eps=1e-5, out_scale=1.0, head_layout="interleaved")
    with pytest.raises(ValueError, match="norm_weight's stride"):
        check_diff_attn_args(q, k, v, 0.5, for_kernel=True, **kw)
    check_diff_attn_args(q, k, v, 0.5, for_kernel=False, **kw)
    check_diff_attn_args(q, k, v, 0.5, for_kernel=True, **dict(kw, norm_weight=w.as_strided((32,), (MAX_TILE_STRIDE,))))
