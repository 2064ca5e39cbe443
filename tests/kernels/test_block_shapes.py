"""Every listed block shape of every kernel, forced (bypassing autotuning and pruning), against the float64 reference:
under the interpreter only one config runs by default, so a shape-dependent bug (a causal split, a tail mask) would
otherwise first show on a GPU. N = 150 gives several blocks and a ragged tail for every shape."""

import pytest
import torch
from cases import make_lam, make_qkv, to64
from conftest import DEVICE
from tolerances import BWD, FWD, assert_close

from kernels import configs, diff_attn, diff_attn_reference

pytest.importorskip("triton")
N = 150


def _row_cases(kernel):
    out = []
    for row in configs.ROWS[kernel]:
        for causal in (False, True):
            if kernel == "fwd" and causal and row.block_m % row.block_n:
                continue  # never listed for causal (pruned; the kernel's static_assert refuses it)
            if causal and row.causal is False:
                continue  # a non-causal-only row (it spills when causal): never listed for causal problems
            d = min(row.head_dims)  # the cheapest head dim the row serves
            dtype = torch.float32 if row.fp32 else torch.float16
            rid = (f"{row.block_m}x{row.block_n}-w{row.warps}-s{row.stages}{'-split' if row.split else ''}"
                   f"-d{d}-{str(dtype)[6:]}")
            out.append(pytest.param(row, causal, d, dtype, id=rid + ("-causal" if causal else "")))
    return out


def _inputs(d, dtype, causal, seed=0):
    q, k, v = make_qkv(1, 2, N, d, dtype, DEVICE, "linear", requires_grad=True, seed=seed)
    lam = make_lam("head", 0.8, 1, 2, N, DEVICE, requires_grad=True)
    w = (1 + 0.5 * torch.randn(2 * d, generator=torch.Generator().manual_seed(seed + 2))).to(DEVICE)
    w.requires_grad_(True)
    dout = torch.randn(1, 2, N, 2 * d, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    return [q, k, v, lam, w], dict(causal=causal, out_scale=0.5), dout


def _run(fn, leaves, kw, dout, grads=True):
    q, k, v, lam, w = leaves
    out = fn(q, k, v, lam, norm_weight=w, **kw)
    return out, (torch.autograd.grad(out, leaves, dout) if grads else None)


@pytest.mark.parametrize("row,causal,d,dtype", _row_cases("fwd"))
def test_forward_block_shape(row, causal, d, dtype, poison):
    leaves, kw, dout = _inputs(d, dtype, causal)
    with configs.force_configs(fwd=row.config()):
        out, _ = _run(diff_attn, leaves, kw, dout, grads=False)
    ref, _ = _run(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double(), grads=False)
    assert_close(out, ref, dtype, FWD, f"fwd {row}")


def _bwd_cases():
    return [pytest.param(kernel, *p.values, id=f"{kernel}-{p.id}") for kernel in ("dkdv", "dq")
            for p in _row_cases(kernel)]


@pytest.mark.parametrize("kernel,row,causal,d,dtype", _bwd_cases())
def test_backward_block_shape(kernel, row, causal, d, dtype, poison):
    leaves, kw, dout = _inputs(d, dtype, causal)
    with configs.force_configs(**{kernel: row.config()}):
        _, ours = _run(diff_attn, leaves, kw, dout)
    _, ref = _run(diff_attn_reference, [to64(x) for x in leaves], kw, dout.double())
    for i, name in enumerate(["dq", "dk", "dv"]):
        if (name == "dq") == (kernel == "dq"):  # the gradients the forced kernel writes
            assert_close(ours[i], ref[i], dtype, BWD, f"{name} {row}")


def test_misaligned_causal_forward_is_refused():
    """A causal forward block with BLOCK_M % BLOCK_N != 0 would mis-mask the diagonal (O(1) errors): the kernel's
    static_assert stops it before it computes anything."""
    import triton

    leaves, kw, dout = _inputs(16, torch.float32, True)
    bad = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=1)
    with configs.force_configs(fwd=bad), pytest.raises(Exception, match="BLOCK_M % BLOCK_N"):
        _run(diff_attn, leaves, kw, dout, grads=False)
