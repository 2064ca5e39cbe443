"""The language-model `diffattn` torch.library ops (kernels/ops_lm.py): opcheck (schema, fake tensors, autograd
registration, AOT dispatch), torch.compile(fullgraph=True) of `diff_attn_varlen` forward + backward and of
`diff_attn_decode` (halves layout, left padding) giving the eager results bit for bit (aot_eager on CPU; Inductor on
CUDA), which path eager and traced calls take, and the varlen double-backward error on both paths."""

import pytest
import torch
from conftest import DEVICE

import kernels
from kernels import diff_attn_decode, diff_attn_varlen

pytest.importorskip("triton")
import kernels.ops_lm  # noqa: E402  (registers the LM ops)

BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"
I32 = dict(dtype=torch.int32, device=DEVICE)


def _varlen_inputs(dtype=torch.float32, requires_grad=True, norm=True, seed=0):
    """Three sequences (one empty), H = 4 diff-heads over Hkv = 2 groups, d = 16, per-token λ."""
    g = torch.Generator().manual_seed(seed)
    lens = [5, 0, 11]
    T, H, Hkv, d = sum(lens), 4, 2, 16

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad)

    q, k, v = rnd(T, 2 * H, d), rnd(T, 2 * Hkv, d), rnd(T, Hkv, 2 * d)
    lam = (0.2 + 0.5 * torch.rand(T, H, generator=g)).to(DEVICE).requires_grad_(requires_grad)
    w = (1 + 0.2 * torch.randn(2 * d, generator=g)).to(DEVICE).requires_grad_(requires_grad) if norm else None
    cu = torch.tensor([0, 5, 5, 16], **I32)
    return q, k, v, lam, w, cu, 11


def _varlen_call(q, k, v, lam, w, cu, n):
    return diff_attn_varlen(q, k, v, lam, cu, cu, n, n, causal=True, norm_weight=w, out_scale=0.3)


def _op_args(inputs):
    q, k, v, lam, w, cu, n = inputs
    return (q, k, v, lam, w, cu, cu, n, n, True, 16**-0.5, 1e-5, 0.3)


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_varlen_opcheck(norm):
    torch.library.opcheck(torch.ops.diffattn.diff_attn_varlen.default, _op_args(_varlen_inputs(norm=norm)))
    no_grad = _op_args(_varlen_inputs(requires_grad=False, norm=norm))
    torch.library.opcheck(torch.ops.diffattn.diff_attn_varlen_inference.default, no_grad)


def test_varlen_backward_opcheck():
    args = _op_args(_varlen_inputs(requires_grad=False))
    out, lse, o2, o_pre = torch.ops.diffattn.diff_attn_varlen(*args)
    dout = torch.randn_like(out)
    q, k, v, lam, w, cu_q, cu_k, mq, mk, causal, scale, eps, out_scale = args
    torch.library.opcheck(torch.ops.diffattn.diff_attn_varlen_backward.default,
                          (dout, q, k, v, lam, w, o_pre, o2, lse, cu_q, cu_k, mq, mk, causal, scale, eps, out_scale,
                           True, True))


def _decode_inputs(dtype=torch.float32):
    """halves layout (transformers' DiffLlama): q (B, 2H, Nq, d), k and v (B, 2Hkv, Nmax, d); left-padded."""
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, Nq, Nmax, d = 2, 4, 2, 2, 40, 16
    q = torch.randn(B, 2 * H, Nq, d, generator=g).to(DEVICE, dtype)
    kc = torch.randn(B, 2 * Hkv, Nmax, d, generator=g).to(DEVICE, dtype)
    vc = torch.randn(B, 2 * Hkv, Nmax, d, generator=g).to(DEVICE, dtype)
    lam = (0.2 + 0.5 * torch.rand(H, generator=g)).to(DEVICE)
    return q, kc, vc, lam, torch.tensor([40, 23], **I32), torch.tensor([3, 20], **I32)


def test_decode_opcheck():
    q, kc, vc, lam, lens, pads = _decode_inputs()
    for leftpad, layout, splits in ((pads, "halves", 2), (None, "halves", None)):
        torch.library.opcheck(torch.ops.diffattn.diff_attn_decode.default,
                              (q, kc, vc, lam.view(1, -1, 1), None, lens, leftpad, layout, 0.25, 1e-5, 1.0, splits))


def test_varlen_compile_fullgraph_forward_and_backward_equal_eager():
    torch._dynamo.reset()
    inputs = _varlen_inputs()
    leaves = [t for t in inputs[:5]]
    dout = torch.randn(16, 4, 32, generator=torch.Generator().manual_seed(7)).to(DEVICE)

    def loss(q, k, v, lam, w, cu, n):
        out = _varlen_call(q, k, v, lam, w, cu, n)
        return out, (out * dout).sum()

    compiled = torch.compile(loss, fullgraph=True, backend=BACKEND)
    out, total = compiled(*inputs)
    assert "CompiledFunction" in type(total.grad_fn).__name__  # the backward is AOTAutograd's graph
    grads = torch.autograd.grad(total, leaves)
    eager_out, eager_total = loss(*inputs)
    eager_grads = torch.autograd.grad(eager_total, leaves)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for name, a, b in zip(["dq", "dk", "dv", "dlam", "dnorm_weight"], grads, eager_grads):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_varlen_compile_fullgraph_inference_equals_eager():
    torch._dynamo.reset()
    inputs = _varlen_inputs(requires_grad=False, norm=False)
    compiled = torch.compile(_varlen_call, fullgraph=True, backend=BACKEND)
    torch.testing.assert_close(compiled(*inputs), _varlen_call(*inputs), rtol=0, atol=0)


def test_decode_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    q, kc, vc, lam, lens, pads = _decode_inputs()

    def step(q, kc, vc, lam, lens, pads):
        return diff_attn_decode(q, kc, vc, lam, cache_seqlens=lens, cache_leftpad=pads, head_layout="halves",
                                num_splits=2) * 2

    compiled = torch.compile(step, fullgraph=True, backend=BACKEND)
    torch.testing.assert_close(compiled(q, kc, vc, lam, lens, pads), step(q, kc, vc, lam, lens, pads), rtol=0,
                               atol=0)


def test_eager_calls_skip_the_ops_and_traced_calls_use_them(monkeypatch):
    """Eager: the direct path (no op dispatch); make_fx (as torch.compile) records the ops: the varlen inference
    op without gradients, the training op with them, the decode op."""
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []
    real = kernels.ops_lm.eager_varlen_inference
    monkeypatch.setattr(kernels.ops_lm, "eager_varlen_inference", lambda *a: seen.append("eager") or real(*a))
    q, k, v, lam, w, cu, n = _varlen_inputs(requires_grad=False, norm=False)
    assert _varlen_call(q, k, v, lam, w, cu, n).grad_fn is None and seen == ["eager"]
    q.requires_grad_(True)
    assert type(_varlen_call(q, k, v, lam, w, cu, n).grad_fn).__name__ == "VarlenFunctionBackward"

    def ops_in(fn, *args):  # every tensor an input of the traced function (fake inside)
        return {str(x.target) for x in make_fx(fn, tracing_mode="fake")(*args).graph.nodes
                if str(x.target).startswith("diffattn.")}

    # λ a number: a CPU tensor λ is checked for finiteness on the host (validate.check_cpu_lam_finite), which
    # make_fx cannot trace (a data-dependent branch); on CUDA there is no such check.
    varlen = (lambda q_, k_, v_, cu_: _varlen_call(q_, k_, v_, 0.5, None, cu_, n))
    with torch.no_grad():
        assert ops_in(varlen, q, k, v, cu) == {"diffattn.diff_attn_varlen_inference.default"}
    assert ops_in(varlen, q, k, v, cu) == {"diffattn.diff_attn_varlen.default"}
    decode = (lambda q_, k_, v_, lens_, pads_: diff_attn_decode(q_, k_, v_, 0.5, cache_seqlens=lens_,
                                                                cache_leftpad=pads_, head_layout="halves"))
    assert ops_in(decode, *_decode_inputs()[:3], *_decode_inputs()[4:]) == {"diffattn.diff_attn_decode.default"}
    assert seen == ["eager"]  # tracing never took the eager path


@pytest.mark.parametrize("path", ["eager", "op"])
def test_varlen_double_backward_raises_a_clear_error_on_both_paths(path):
    """create_graph=True: first-order gradients unchanged; differentiating them again raises our message (also with
    a constant dout, loss = out.sum())."""
    q, k, v, lam, w, cu, n = _varlen_inputs(norm=False)

    def out_of():
        if path == "eager":
            return _varlen_call(q, k, v, lam, None, cu, n)
        return torch.ops.diffattn.diff_attn_varlen(q, k, v, lam, None, cu, cu, n, n, True, 16**-0.5, 1e-5, 0.3)[0]

    plain = torch.autograd.grad(out_of().sum(), (q, k, v, lam))
    grads = torch.autograd.grad(out_of().sum(), (q, k, v, lam), create_graph=True)
    for a, b in zip(plain, grads):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="diff_attn_varlen has no double backward.*diff_attn_varlen_reference"):
        sum(g.square().sum() for g in grads).backward()
