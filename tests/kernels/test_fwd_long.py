"""The forward rows for long sequences (issue 17): the wider fused block and the one-accumulator SPLIT form, each
forced (bypassing autotuning and its N >= LONG pruning) and checked against the float64 reference at ragged N,
causal and not, fp32 and fp16, with every output poisoned first; the training forward's saved state (LSE, O2, the
pre-norm difference) too, since the backward reads it. The SPLIT form computes the same arithmetic in the same
order as the fused form, so under the interpreter both give the same bits for the same block shape."""

import math

import pytest
import torch
from cases import make_lam, make_qkv, to64
from conftest import DEVICE
from tolerances import BWD, FWD, assert_close

from kernels import configs, diff_attn, diff_attn_reference
from kernels.fwd import diff_attn_fwd

triton = pytest.importorskip("triton")

LONG_ROWS = [r for r in configs.ROWS["fwd"] if r.min_seqlen >= configs.LONG]
NS = [1, 77, 197, 300]
# fp32 on CPU only: these are 16-bit rows (on a GPU, fp32 inputs get their own 16x16 rows; forcing a 128-row
# block onto ieee fp32 dots would not fit the shared memory)
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16]


def _rid(row):
    return f"{row.block_m}x{row.block_n}-w{row.warps}-s{row.stages}{'-split' if row.split else ''}"


def _cases():
    out = []
    for row in LONG_ROWS:
        for causal in (False, True):
            if causal and row.causal is False:
                continue  # pruned for causal problems (it spills there)
            for i, N in enumerate(NS):
                d = row.head_dims[0]
                for dtype in DTYPES:
                    norm = (i + causal) % 2 == 0  # half the cases with the norm epilogue (and its saved o_pre)
                    cid = f"{_rid(row)}-d{d}-N{N}{'-causal' if causal else ''}{'-norm' if norm else ''}-{str(dtype)[6:]}"
                    out.append(pytest.param(row, N, d, causal, norm, dtype, id=cid))
    return out


def test_long_rows_are_listed_as_the_issue_asks():
    """Every long row is Hopper-only, fp16/bf16, and both forms are present for d = 64 and d = 128."""
    assert LONG_ROWS and all(r.min_sm == 90 and not r.fp32 for r in LONG_ROWS)
    for d in (64, 128):
        for causal in (False, True):
            p = configs.Problem(d, 2, causal, 4096, 90)
            assert any(r.split for r in configs.fitting_rows("fwd", p)), p
            assert not any(r.min_seqlen for r in configs.fitting_rows("fwd", configs.Problem(d, 2, causal, 197, 90)))


def _expected(q, k, v, lam, w, causal, scale):
    """float64 reference of out, the pre-norm difference, O2 and both LSEs (log2 domain)."""
    q, k, v, lam = to64(q), to64(k), to64(v), to64(lam)
    B, H2, N, d = q.shape
    s = (q @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.softmax(s, -1).view(B, H2 // 2, 2, N, N)
    o1, o2 = p[:, :, 0] @ v, p[:, :, 1] @ v
    pre = o1 - lam[..., None] * o2
    lse = torch.logsumexp(s, -1) / math.log(2)
    return pre, o2, lse


@pytest.mark.parametrize("row,N,d,causal,norm,dtype", _cases())
def test_long_row_matches_float64_reference(row, N, d, causal, norm, dtype, poison):
    B, H = 1, 2
    q, k, v = make_qkv(B, H, N, d, dtype, DEVICE, "linear", seed=N)
    lam = torch.as_tensor(make_lam("token", 0.8, B, H, N, DEVICE))
    w = (1 + 0.5 * torch.randn(2 * d, generator=torch.Generator().manual_seed(3))).to(DEVICE) if norm else None
    scale = d ** -0.5
    with configs.force_configs(fwd=row.config()):
        out, lse, o2, o_pre = diff_attn_fwd(q, k, v, lam, w, causal=causal, scale=scale, norm_eps=1e-5,
                                            out_scale=0.5, save_for_bwd=True)
        inference = diff_attn(q, k, v, lam, causal=causal, norm_weight=w, out_scale=0.5)
    assert configs.row_of("fwd", configs.LAST_CONFIG["fwd"]) is row
    pre, o2_ref, lse_ref = _expected(q, k, v, lam, w, causal, scale)
    ref = diff_attn_reference(to64(q), to64(k), to64(v), to64(lam), causal=causal, norm_weight=to64(w),
                              out_scale=0.5)
    what = f"{_rid(row)} N={N}"
    assert_close(out, ref, dtype, FWD, f"out {what}")
    assert torch.equal(inference, out), "the inference forward (nothing saved) must give the same bits"
    assert_close(o2, o2_ref, dtype, FWD, f"o2 {what}")
    torch.testing.assert_close(lse.double(), lse_ref, atol=1e-5, rtol=1e-5)  # fp32 state, as test_diff_attn_fwd
    if norm:
        assert_close(o_pre, pre, dtype, FWD, f"o_pre {what}")
    else:
        assert o_pre is None


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_split_form_gives_the_fused_forms_bits(causal, poison):
    """Same block shape, SPLIT or not: the same values (the interpreter's arithmetic is deterministic; on a GPU the
    compiler may order the fused form's work differently, so this holds under the interpreter only)."""
    if DEVICE == "cuda":
        pytest.skip("bitwise equality of the two forms is an interpreter property")
    q, k, v = make_qkv(2, 2, 150, 16, torch.float16, DEVICE, "fused")
    lam = make_lam("head", 0.6, 2, 2, 150, DEVICE)
    outs = []
    for split in (False, True):
        kw = {"BLOCK_M": 32, "BLOCK_N": 16, **({"SPLIT": True} if split else {})}
        with configs.force_configs(fwd=triton.Config(kw, num_warps=4, num_stages=1)):
            outs.append(diff_attn_fwd(q, k, v, torch.broadcast_to(lam[:, None], (2, 2, 150)),
                                      torch.ones(32, device=DEVICE), causal=causal, scale=0.25, norm_eps=1e-5,
                                      out_scale=1.0, save_for_bwd=True))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_from_the_split_forwards_saved_state(causal, poison):
    """The training forward of a SPLIT row feeds the backward: gradients match the float64 reference."""
    row = next(r for r in LONG_ROWS if r.split and 64 in r.head_dims and r.causal is None)
    q, k, v = make_qkv(1, 1, 77, 64, torch.float16, DEVICE, "linear", requires_grad=True)
    lam = make_lam("head", 0.8, 1, 1, 77, DEVICE, requires_grad=True)
    w = torch.linspace(0.5, 1.5, 128, device=DEVICE).requires_grad_(True)
    dout = torch.randn(1, 1, 77, 128, generator=torch.Generator().manual_seed(5)).to(DEVICE, torch.float16)
    leaves = [q, k, v, lam, w]
    with configs.force_configs(fwd=row.config()):
        out = diff_attn(q, k, v, lam, causal=causal, norm_weight=w)
    ours = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [to64(x) for x in leaves]
    ref = torch.autograd.grad(diff_attn_reference(*ref_leaves[:4], causal=causal, norm_weight=ref_leaves[4]),
                              ref_leaves, dout.double())
    for name, a, b in zip(["dq", "dk", "dv", "dlam", "dw"], ours, ref):
        assert_close(a, b, torch.float16, BWD, name)


def test_split_scratch_only_when_a_split_row_may_run(monkeypatch):
    """The SPLIT form's fp32 scratch is allocated only where a SPLIT row may launch: forced, or among the rows
    autotuning may pick (long sequences on Hopper), or the fixed row; never for the interpreter's own config."""
    long, short = configs.Problem(64, 2, False, 4096, 90), configs.Problem(64, 2, False, 197, 90)
    split_cfg = next(r for r in LONG_ROWS if r.split).config()
    with configs.force_configs(fwd=split_cfg):
        assert configs.fwd_may_split(short)
    with configs.force_configs(fwd=configs.ROWS["fwd"][0].config()):
        assert not configs.fwd_may_split(long)
    assert not configs.fwd_may_split(long)  # the interpreter's config (tests run without a GPU or fixed rows)
    monkeypatch.setattr(configs, "interpreter_enabled", lambda: False)
    monkeypatch.setenv("DIFF_ATTN_AUTOTUNE", "1")
    monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
    assert configs.fwd_may_split(long) and not configs.fwd_may_split(short)
    assert not configs.fwd_may_split(configs.Problem(64, 2, False, 4096, 80))
    # once the key is tuned, the recorded choice decides: a fused row needs no 268 MB scratch, a SPLIT one does
    fused_cfg = next(r for r in LONG_ROWS if not r.split).config()
    assert not configs.fwd_may_split(long, fused_cfg) and configs.fwd_may_split(long, split_cfg)
    monkeypatch.setenv("DIFF_ATTN_AUTOTUNE", "0")  # the fixed row (the measured 128x32 winner) is not SPLIT
    assert not configs.fwd_may_split(long)
