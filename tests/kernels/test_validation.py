"""Every bad input gets a clear TypeError/ValueError/RuntimeError that names the argument, before any launch."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

from kernels import diff_attn, diff_attn_reference

B, H, N, d = 2, 3, 10, 16


def good(**over):
    args = dict(
        q=torch.randn(B, 2 * H, N, d, device=DEVICE),
        k=torch.randn(B, 2 * H, N, d, device=DEVICE),
        v=torch.randn(B, H, N, 2 * d, device=DEVICE),
        lam=0.5,
    )
    args.update(over)
    return args


def call(fn, args, **kw):
    return fn(args["q"], args["k"], args["v"], args["lam"], **kw)


CASES = [
    # (id, overrides, kwargs, error type, words the message must contain)
    ("q-not-tensor", dict(q=[[1.0]]), {}, TypeError, ["q", "torch.Tensor"]),
    ("v-not-tensor", dict(v=None), {}, TypeError, ["v", "torch.Tensor"]),
    ("q-rank3", dict(q=torch.randn(2 * H, N, d)), {}, ValueError, ["q", "4-d"]),
    ("v-rank5", dict(v=torch.randn(1, B, H, N, 2 * d)), {}, ValueError, ["v", "4-d"]),
    ("odd-heads", dict(q=torch.randn(B, 5, N, d), k=torch.randn(B, 5, N, d)), {}, ValueError, ["even", "heads"]),
    ("k-shape", dict(k=torch.randn(B, 2 * H, N + 1, d)), {}, ValueError, ["k", "shape"]),
    ("v-width", dict(v=torch.randn(B, H, N, d)), {}, ValueError, ["v", "2d"]),
    ("v-heads", dict(v=torch.randn(B, H + 1, N, 2 * d)), {}, ValueError, ["v", "(B, Hkv, N, 2d)"]),
    ("v-batch", dict(v=torch.randn(B + 1, H, N, 2 * d)), {}, ValueError, ["v"]),
    ("v-length", dict(v=torch.randn(B, H, N + 2, 2 * d)), {}, ValueError, ["v"]),
    ("dtype-mismatch", dict(k=torch.randn(B, 2 * H, N, d, dtype=torch.float64)), {}, TypeError, ["dtype"]),
    ("int-inputs", dict(q=torch.ones(B, 2 * H, N, d, dtype=torch.int32), k=torch.ones(B, 2 * H, N, d,
     dtype=torch.int32), v=torch.ones(B, H, N, 2 * d, dtype=torch.int32)), {}, TypeError, ["floating"]),
    ("lam-nan", dict(lam=float("nan")), {}, ValueError, ["lam", "finite"]),
    ("lam-inf-tensor", dict(lam=torch.tensor(float("inf"))), {}, ValueError, ["lam", "finite"]),
    ("lam-bool", dict(lam=True), {}, TypeError, ["lam"]),
    ("lam-str", dict(lam="0.5"), {}, TypeError, ["lam"]),
    ("lam-int-tensor", dict(lam=torch.tensor(1)), {}, TypeError, ["lam", "floating"]),
    ("lam-wrong-heads", dict(lam=torch.rand(H + 1)), {}, ValueError, ["lam", "(H,)"]),
    ("lam-wrong-tokens", dict(lam=torch.rand(B, H, N + 1)), {}, ValueError, ["lam", "broadcastable"]),
    ("lam-rank4", dict(lam=torch.rand(1, B, H, N)), {}, ValueError, ["lam"]),
    ("norm-size", {}, dict(norm_weight=torch.ones(d)), ValueError, ["norm_weight", "(2d,)"]),
    ("norm-not-tensor", {}, dict(norm_weight=[1.0] * 2 * d), TypeError, ["norm_weight"]),
    ("norm-eps-zero", {}, dict(norm_weight=torch.ones(2 * d), norm_eps=0.0), ValueError, ["norm_eps", "> 0"]),
    ("norm-eps-negative", {}, dict(norm_eps=-1e-5), ValueError, ["norm_eps"]),
    ("scale-zero", {}, dict(scale=0.0), ValueError, ["scale", "> 0"]),
    ("scale-negative", {}, dict(scale=-0.1), ValueError, ["scale"]),
    ("scale-nan", {}, dict(scale=float("nan")), ValueError, ["scale", "finite"]),
    ("out-scale-inf", {}, dict(out_scale=float("inf")), ValueError, ["out_scale"]),
    ("causal-not-bool", {}, dict(causal=1), TypeError, ["causal", "bool"]),
]


@pytest.mark.parametrize("fn", [diff_attn, diff_attn_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize("over,kw,err,words", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_raises_named_error(fn, over, kw, err, words):
    with pytest.raises(err) as info:
        call(fn, good(**over), **kw)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize("dd", [8, 24, 256])
def test_kernel_rejects_unsupported_head_dim(dd):
    args = good(q=torch.randn(1, 2, 4, dd), k=torch.randn(1, 2, 4, dd), v=torch.randn(1, 1, 4, 2 * dd))
    with pytest.raises(ValueError, match="head dim"):
        call(diff_attn, args)
    assert call(diff_attn_reference, args).shape == (1, 1, 4, 2 * dd)  # the reference runs any d


def test_kernel_rejects_float64():
    args = good(**{n: t.double() for n, t in good().items() if n != "lam"})
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        call(diff_attn, args)


def test_device_mismatch_is_named():
    meta = torch.randn(B, H, N, 2 * d, device="meta")
    with pytest.raises(ValueError, match="one device"):
        call(diff_attn, good(v=meta))


def test_cpu_without_interpreter_says_how_to_run():
    """Outside the interpreter, CPU tensors get a RuntimeError pointing at TRITON_INTERPRET=1 and the reference."""
    code = (
        "import torch, kernels\n"
        "q = torch.randn(1, 2, 4, 16); v = torch.randn(1, 1, 4, 32)\n"
        "try:\n    kernels.diff_attn(q, q, v, 0.5)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
    assert out.startswith("ERR") and "TRITON_INTERPRET=1" in out and "diff_attn_reference" in out


def test_import_kernels_without_triton():
    """`import kernels` and the reference work where Triton is missing; the kernel then raises RuntimeError."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib.util as u; u.find_spec = (lambda f: (lambda n, *a: None if n == 'triton' else f(n, *a)))"
        "(u.find_spec)\n"
        "import torch, kernels\n"
        "q = torch.randn(1, 2, 4, 16); v = torch.randn(1, 1, 4, 32)\n"
        "print(kernels.diff_attn_reference(q, q, v, 0.5).shape)\n"
        "try:\n    kernels.diff_attn(q, q, v, 0.5)\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "torch.Size([1, 1, 4, 32])" in proc.stdout, proc.stderr
    assert "ERR Triton is not installed" in proc.stdout, proc.stdout + proc.stderr
