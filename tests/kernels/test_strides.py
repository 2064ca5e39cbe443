"""Layouts beyond the model's: a norm weight of any strides and dtype, row offsets past 2^31 elements (64-bit block
bases), and a clear error for strides the kernel's 32-bit in-tile offsets cannot hold."""

import os
import subprocess
import sys

import pytest
import torch
from cases import make_qkv, to64
from conftest import DEVICE
from tolerances import BWD, FWD, assert_close

from kernels import diff_attn, diff_attn_reference
from kernels.validate import MAX_TILE_STRIDE

pytest.importorskip("triton")
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)


def _weight(kind, d):
    """(leaf, w): a norm weight that is not a contiguous (2d,) fp32 tensor, and the leaf its gradient reaches."""
    base = 1 + 0.3 * torch.randn(4 * d, generator=torch.Generator().manual_seed(3))
    if kind == "expanded":  # stride 0: one stored element read 2d times
        leaf = torch.full((1,), 1.7, device=DEVICE, requires_grad=True)
        return leaf, leaf.expand(2 * d)
    if kind == "sliced":  # stride 2
        leaf = base.to(DEVICE).requires_grad_(True)
        return leaf, leaf[::2]
    leaf = base[: 2 * d].to(DEVICE, {"fp16": torch.float16, "fp64": torch.float64}[kind]).requires_grad_(True)
    return leaf, leaf


@pytest.mark.parametrize("kind", ["sliced", "expanded", "fp16", "fp64"])
def test_norm_weight_of_any_strides_and_dtype(kind, poison):
    B, H, N, d = 1, 2, 77, 32
    leaf, w = _weight(kind, d)
    q, k, v = make_qkv(B, H, N, d, torch.float32, DEVICE, requires_grad=True)
    dout = torch.randn(B, H, N, 2 * d, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    kw = dict(causal=True, out_scale=0.3)
    out = diff_attn(q, k, v, 0.6, norm_weight=w, **kw)
    grads = torch.autograd.grad(out, [q, k, v, leaf], dout)

    leaf64 = leaf.detach().double().requires_grad_(True)
    w64 = {"expanded": lambda t: t.expand(2 * d), "sliced": lambda t: t[::2]}.get(kind, lambda t: t)(leaf64)
    l64 = [to64(x) for x in (q, k, v)]
    ref = diff_attn_reference(*l64, 0.6, norm_weight=w64, **kw)
    ref_grads = torch.autograd.grad(ref, l64 + [leaf64], dout.double())
    assert_close(out, ref, torch.float32, FWD, f"out ({kind} weight)")
    for name, a, b in zip(["dq", "dk", "dv", "dnorm_weight"], grads, ref_grads):
        assert a.shape == b.shape and a.dtype == (leaf.dtype if name == "dnorm_weight" else torch.float32), name
        tol = torch.float16 if a.dtype == torch.float16 else torch.float32  # an fp16 weight gets an fp16 gradient
        assert_close(a, b, tol, BWD, f"{name} ({kind} weight)")


def test_strides_too_large_for_tile_offsets_are_refused():
    s = MAX_TILE_STRIDE + 16
    q = torch.zeros(2 * s).as_strided((1, 2, 2, 16), (0, 16, s, 1))  # rows 2^22 + 16 elements apart
    k = torch.randn(1, 2, 2, 16)
    v = torch.randn(1, 1, 2, 32)
    with pytest.raises(ValueError, match=r"q has strides .* at most 2\^22"):
        diff_attn(q, k, v, 0.5)


# Rows more than 2^31 elements apart: a (N, 2^22) fp16 buffer (about 4.4 GB of address space, of which only the
# touched rows are backed by memory) holding q, k and v of one diff-head per row. Run in a subprocess: with 32-bit
# offsets this reads wild addresses and crashes the interpreter (or faults the GPU context) instead of failing.
_OFFSETS_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from tolerances import BWD, FWD, assert_close
from kernels import diff_attn, diff_attn_reference
device, N, d, S = sys.argv[2], 520, 16, 2**22
assert (N - 1) * S > 2**31
buf = torch.empty(N, S, dtype=torch.float16, device=device)
w = 2 * d
g = torch.Generator().manual_seed(0)
buf[:, : 3 * w] = torch.randn(N, 3 * w, generator=g).to(device, torch.float16)
q = buf[:, :w].view(N, 2, d).permute(1, 0, 2).unsqueeze(0).detach().requires_grad_(True)
k = buf[:, w : 2 * w].view(N, 2, d).permute(1, 0, 2).unsqueeze(0).detach().requires_grad_(True)
v = buf[:, 2 * w : 3 * w].view(N, 1, 2 * d).permute(1, 0, 2).unsqueeze(0).detach().requires_grad_(True)
assert q.stride(2) == S
dout = torch.randn(1, 1, N, 2 * d, generator=g).to(device, torch.float16)
for causal in (False, True):
    out = diff_attn(q, k, v, 0.7, causal=causal)
    grads = torch.autograd.grad(out, [q, k, v], dout)
    l64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref = diff_attn_reference(*l64, 0.7, causal=causal)
    ref_grads = torch.autograd.grad(ref, l64, dout.double())
    assert_close(out, ref, torch.float16, FWD, "out")
    for name, a, b in zip(["dq", "dk", "dv"], grads, ref_grads):
        assert_close(a, b, torch.float16, BWD, name)
print("ok")
"""


@pytest.mark.slow
def test_row_offsets_past_2_pow_31(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _OFFSETS_SCRIPT, TESTS, DEVICE], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
