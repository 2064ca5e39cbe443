"""The backward forms of issue 18 (kernels/bwd_fused.py, `configs.bwd_form`): the one-launch deterministic `fused`
form and the opt-in `atomic` form (dQ accumulated with fp32 atomic adds), and the backward rows added with them.

Every variant and row is forced (DIFF_ATTN_BWD, `configs.force_configs`) and compared with autograd through a float64
evaluation of the reference at ragged N, causal and not, with dλ (per token) and the norm weight's gradient, outputs
poisoned (NaN) so that an element no program writes fails."""

import pytest
import torch
from cases import make_lam, make_qkv, to64
from conftest import DEVICE
from tolerances import BWD, BWD_ROW_SUMS, assert_close

from kernels import bwd, configs, diff_attn, diff_attn_reference

triton = pytest.importorskip("triton")

NS = [1, 77, 197, 300]
NAMES = ["dq", "dk", "dv", "dlam", "dnorm_weight"]
# Backward rows added by issue 18 (never timed on a device yet): (kernel, row key)
NEW_ROWS = [("dkdv", (16, 128, 8, 2, False)), ("dkdv", (16, 64, 4, 3, False)), ("dq", (128, 64, 8, 2, None)),
            ("dq", (64, 64, 4, 2, None))]


def _inputs(N, d, dtype, causal, seed=0):
    q, k, v = make_qkv(1, 2, N, d, dtype, DEVICE, "linear", requires_grad=True, seed=seed)
    # λ per token in [0.5, 0.625]: near 1, N = 1 makes o = (1 - λ)·V vanish and the norm amplify its rounding
    lam = make_lam("token", 0.5, 1, 2, N, DEVICE, requires_grad=True)
    w = (1 + 0.5 * torch.randn(2 * d, generator=torch.Generator().manual_seed(seed + 2))).to(DEVICE)
    w.requires_grad_(True)
    dout = torch.randn(1, 2, N, 2 * d, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return [q, k, v, lam, w], dict(causal=causal, out_scale=0.5), dout


def _grads(fn, leaves, kw, dout):
    q, k, v, lam, w = leaves
    return torch.autograd.grad(fn(q, k, v, lam, norm_weight=w, **kw), leaves, dout)


def _check(leaves, kw, dout, dtype, what, only=None):
    ours = _grads(diff_attn, leaves, kw, dout)
    ref = _grads(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double())
    for name, a, b in zip(NAMES, ours, ref):
        if only is None or name in only:
            table = BWD_ROW_SUMS if name in ("dlam", "dnorm_weight") else BWD
            assert_close(a, b, dtype, table, f"{what} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("name", ["fused", "atomic"])
def test_form_gradients_match_float64_reference(name, N, causal, dtype, form, poison):
    form(name)
    leaves, kw, dout = _inputs(N, 16, dtype, causal)
    _check(leaves, kw, dout, dtype, name)


def _fused_row_cases():
    out = []
    for name in ("fused", "atomic"):
        for j, row in enumerate(configs.ROWS[name]):
            d = min(row.head_dims)
            dtype = torch.float32 if row.fp32 else torch.float16
            rid = f"{row.block_m}x{row.block_n}-w{row.warps}-s{row.stages}{'-split' if row.split else ''}-d{d}"
            for i, causal in enumerate((False, True)):
                if causal and (name, row.key) in configs._FULL_ONLY:
                    continue
                out.append(pytest.param(row, name, causal, d, dtype, NS[(2 * j + i) % 4],
                                        id=f"{name}-{rid}-{'causal' if causal else 'full'}"))
    return out


@pytest.mark.parametrize("row,name,causal,d,dtype,N", _fused_row_cases())
def test_fused_row_gradients(row, name, causal, d, dtype, N, form, poison):
    """Every listed one-launch row of each form, causal (where listed) and not; N cycles over 1, 77, 197, 300."""
    form(name)
    leaves, kw, dout = _inputs(N, d, dtype, causal, seed=N)
    with configs.force_configs(**{name: row.config()}):
        _check(leaves, kw, dout, dtype, f"{name} {row}")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("kernel,key", NEW_ROWS, ids=lambda x: "x".join(map(str, x[:4])) if isinstance(x, tuple)
                         else x)
def test_new_separate_row_gradients(kernel, key, N, causal, form, poison):
    form("separate")
    row = configs._ROW_BY_KEY[kernel][key]
    d = min(row.head_dims)
    leaves, kw, dout = _inputs(N, d, torch.float16, causal, seed=N + 1)
    with configs.force_configs(**{kernel: row.config()}):
        _check(leaves, kw, dout, torch.float16, f"{kernel} {row}",
               only=("dq",) if kernel == "dq" else ("dk", "dv", "dlam", "dnorm_weight"))


def test_fused_is_deterministic_and_agrees_with_separate(form, poison):
    """fused: the same bits twice; dK and dV are the separate form's bits (the same program with the same blocks
    under the interpreter), dQ agrees to rounding (another summation order)."""
    leaves, kw, dout = _inputs(197, 32, torch.float16, True)
    form("separate")
    sep = _grads(diff_attn, leaves, kw, dout)
    form("fused")
    first, second = _grads(diff_attn, leaves, kw, dout), _grads(diff_attn, leaves, kw, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for name, a, b in zip(NAMES, first, sep):
        if name == "dq":
            assert_close(a, b, torch.float16, BWD, name)
        else:
            assert torch.equal(a, b), name


class _Spy:
    """Wraps `bwd.launch`, recording (kernel, DQ_ATOMIC) per launch."""

    def __init__(self):
        self.calls = []

    def __call__(self, kernel, autotuned, grid, args, kwargs, p):
        self.calls.append((kernel, kwargs.get("DQ_ATOMIC")))
        return configs.launch(kernel, autotuned, grid, args, kwargs, p)


@pytest.mark.parametrize("how", ["torch", "env"])
def test_atomic_form_is_off_in_deterministic_mode(how, monkeypatch, poison):
    monkeypatch.setenv("DIFF_ATTN_BWD", "atomic")
    monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
    assert configs.bwd_form() == "atomic"
    spy = _Spy()
    monkeypatch.setattr(bwd, "launch", spy)
    leaves, kw, dout = _inputs(77, 16, torch.float32, False)
    _grads(diff_attn, leaves, kw, dout)
    assert spy.calls == [("atomic", True)]
    spy.calls.clear()
    if how == "torch":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    else:
        monkeypatch.setenv("DIFF_ATTN_DETERMINISTIC", "1")
    assert configs.bwd_form() == "fused"
    _check(leaves, kw, dout, torch.float32, "deterministic")
    assert spy.calls == [("fused", False)]


def test_default_form_is_separate(monkeypatch, poison):
    monkeypatch.delenv("DIFF_ATTN_BWD", raising=False)
    spy = _Spy()
    monkeypatch.setattr(bwd, "launch", spy)
    leaves, kw, dout = _inputs(40, 16, torch.float32, True)
    _grads(diff_attn, leaves, kw, dout)
    assert configs.bwd_form() == "separate" and spy.calls == [("dkdv", None), ("dq", None)]


def test_unknown_form_is_refused(monkeypatch):
    monkeypatch.setenv("DIFF_ATTN_BWD", "fastest")
    with pytest.raises(ValueError, match="DIFF_ATTN_BWD"):
        configs.bwd_form()


def test_fused_rows_cover_every_16bit_problem_class_and_stay_few():
    for kernel in ("fused", "atomic"):
        for d in (16, 32, 64, 128):
            for sm in (80, 90):
                for causal in (False, True):
                    rows = configs.fitting_rows(kernel, configs.Problem(d, 2, causal, 4096, sm))
                    assert 1 <= len(rows) <= 5, (kernel, d, sm, causal)
                    assert not configs.fitting_rows(kernel, configs.Problem(d, 4, causal, 4096, sm))


def test_fp32_runs_the_separate_form_on_a_gpu(monkeypatch):
    """The one-launch forms have no fp32 rows (they spill): on a GPU an fp32 problem falls back to separate, saying
    so (a RuntimeWarning: the form was asked for); a problem with rows takes the form without a word."""
    import warnings

    monkeypatch.setenv("DIFF_ATTN_BWD", "atomic")
    monkeypatch.delenv("DIFF_ATTN_DETERMINISTIC", raising=False)
    monkeypatch.setattr(configs, "interpreter_enabled", lambda: False)
    with pytest.warns(RuntimeWarning, match="DIFF_ATTN_BWD=atomic: no spill-free atomic row"):
        assert configs.bwd_form(configs.Problem(64, 4, False, 197, 90)) == "separate"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configs.bwd_form(configs.Problem(64, 2, False, 197, 90)) == "atomic"
        assert configs.bwd_form(configs.Problem(64, 2, False, 197, 80)) == "atomic"


def test_fused_autotune_key():
    from kernels import bwd_fused

    for tuner in (bwd_fused._bwd_fused, bwd_fused._bwd_atomic):
        assert set(tuner.keys) <= set(tuner.arg_names)
        assert {"N_BUCKET", "GRID_BUCKET", "HEAD_DIM", "CAUSAL", "ARCH", "DQ_ATOMIC"} <= set(tuner.keys)
