"""The `diffattn` torch.library ops: opcheck (schema, fake tensors, autograd registration, AOT dispatch), torch.compile
with fullgraph=True over forward + backward (aot_eager on CPU; Inductor on CUDA), dynamic shapes reusing one graph,
and autocast."""

import pytest
import torch
from cases import make_lam, make_qkv, to64
from conftest import DEVICE
from tolerances import BWD, FWD, assert_close

import kernels
from kernels import diff_attn, diff_attn_reference

pytest.importorskip("triton")
import kernels.ops  # noqa: E402,F401  (registers torch.ops.diffattn)

BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"
DTYPES = [torch.float32, torch.float16]


def _op_args(dtype, causal, norm, N=33, d=16, requires_grad=True):
    q, k, v = make_qkv(1, 2, N, d, dtype, DEVICE, "linear", requires_grad=requires_grad)
    lam = make_lam("head", 0.7, 1, 2, N, DEVICE, requires_grad=requires_grad).view(1, 2, 1)
    w = (1 + 0.1 * torch.randn(2 * d)).to(DEVICE).requires_grad_(requires_grad) if norm else None
    return (q, k, v, lam, w, causal, d**-0.5, 1e-5, 0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_opcheck(dtype, causal, norm):
    args = _op_args(dtype, causal, norm)
    torch.library.opcheck(torch.ops.diffattn.diff_attn.default, args)
    no_grad = _op_args(dtype, causal, norm, requires_grad=False)
    torch.library.opcheck(torch.ops.diffattn.diff_attn_inference.default, no_grad)


def test_public_wrapper_dispatch(monkeypatch):
    """Eager calls run the direct path (no op dispatch: a third of the host time); traced calls — here make_fx,
    torch.compile in the compile tests below — go through the ops: inference through the one that writes no
    backward state, training through the one that does."""
    from torch.fx.experimental.proxy_tensor import make_fx

    seen = []
    real = kernels.ops.eager_inference
    monkeypatch.setattr(kernels.ops, "eager_inference", lambda *a: seen.append("eager_inference") or real(*a))
    q, k, v = make_qkv(1, 1, 17, 16, torch.float32, DEVICE)
    with torch.no_grad():
        assert diff_attn(q, k, v, 0.5).grad_fn is None
    assert seen == ["eager_inference"]
    q.requires_grad_(True)
    assert type(diff_attn(q, k, v, 0.5).grad_fn).__name__ == "DiffAttnFunctionBackward"

    def traced_ops(grad):
        with torch.set_grad_enabled(grad):
            gm = make_fx(lambda q_, k_, v_: diff_attn(q_, k_, v_, 0.5), tracing_mode="fake")(q, k, v)
        return {str(n.target) for n in gm.graph.nodes if str(n.target).startswith("diffattn.")}

    assert traced_ops(False) == {"diffattn.diff_attn_inference.default"}
    assert traced_ops(True) == {"diffattn.diff_attn.default"}
    assert seen == ["eager_inference"]  # tracing never took the eager path


def test_torch_func_transforms_are_refused_clearly():
    """torch.func runs the backward on wrapped tensors, which Triton cannot read: a named error, not a crash in
    the launcher."""
    q, k, v = make_qkv(1, 1, 8, 16, torch.float32, DEVICE)
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.func.grad(lambda q_: diff_attn(q_, k, v, 0.5).sum())(q)
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        torch.vmap(lambda q_: diff_attn(q_, k, v, 0.5))(q[None])


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_eager_path_equals_the_ops_bit_for_bit(causal, norm):
    """The eager autograd.Function and the registered ops run the same forward/backward functions: outputs and
    every gradient (q, k, v, a per-head λ, the norm weight) are identical, not just close."""
    q, k, v = make_qkv(2, 2, 23, 16, torch.float32, DEVICE)
    lam = make_lam("head", 0.6, 2, 2, 23, DEVICE)
    w = torch.randn(32, device=DEVICE) if norm else None
    dout = torch.randn(2, 2, 23, 32, device=DEVICE)
    results = []
    for via_ops in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, lam)]
        wl = w.detach().clone().requires_grad_() if norm else None
        call = (*leaves[:3], leaves[3].view(-1, 1), wl, causal, 0.25, 1e-5, 0.8)
        out = torch.ops.diffattn.diff_attn(*call)[0] if via_ops else kernels.ops.DiffAttnFunction.apply(*call)
        out.backward(dout)
        results.append([out] + [t.grad for t in leaves] + ([wl.grad] if norm else []))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _call(path, q, k, v, lam, causal=True):
    if path == "eager":
        return diff_attn(q, k, v, lam, causal=causal)
    return torch.ops.diffattn.diff_attn(q, k, v, lam.view(1, 1, 1), None, causal, q.shape[-1] ** -0.5, 1e-5, 1.0)[0]


@pytest.mark.parametrize("path", ["eager", "op"])
@pytest.mark.parametrize("loss", ["square", "sum"], ids=["dout_needs_grad", "dout_constant"])
def test_double_backward_raises_the_same_clear_error_on_both_paths(path, loss):
    """Issue 20, item 1: with create_graph=True the eager path returned gradients without a grad_fn, so a gradient
    penalty built from them was silently dropped (the op path raised PyTorch's generic error). Both now raise our
    message when the gradients are differentiated again, also when dout is a constant (loss = out.sum(): dq still
    depends on q, k, v); the first-order gradients are unchanged by create_graph."""
    q, k, v = make_qkv(1, 2, 13, 16, torch.float32, DEVICE, requires_grad=True)
    lam = torch.tensor(0.6, device=DEVICE, requires_grad=True)
    reduce = (lambda o: o.square().sum()) if loss == "square" else (lambda o: o.sum())
    plain = torch.autograd.grad(reduce(_call(path, q, k, v, lam)), (q, k, v, lam))
    grads = torch.autograd.grad(reduce(_call(path, q, k, v, lam)), (q, k, v, lam), create_graph=True)
    for a, b in zip(plain, grads):
        assert torch.equal(a, b)
    assert all(g.grad_fn is not None for g in grads)  # not constants: differentiating them must not go unnoticed
    penalty = sum(g.square().sum() for g in grads)
    with pytest.raises(RuntimeError, match="kernels.diff_attn has no double backward.*diff_attn_reference"):
        penalty.backward()


def test_reference_supports_double_backward():
    """The alternative the error names: the reference is twice differentiable (float64 gradgradcheck)."""
    q, k, v = (t.double().requires_grad_() for t in make_qkv(1, 1, 5, 16, torch.float32, DEVICE))
    lam = torch.tensor(0.6, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.linspace(0.5, 1.5, 32, device=DEVICE, dtype=torch.float64, requires_grad=True)
    f = lambda q, k, v, lam, w: diff_attn_reference(q, k, v, lam, causal=True, norm_weight=w, out_scale=0.7)  # noqa
    assert torch.autograd.gradgradcheck(f, (q, k, v, lam, w))


def test_no_zero_gradients_materialised_for_the_saved_outputs():
    """Issue 20, item 2: lse, o2 and o_pre never get a gradient; autograd used to allocate and zero three buffers
    of their size per backward of the op (aten::zeros in the eager op path). Neither the op's eager backward nor
    the traced backward graph may create zeros or fills."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    q, k, v, lam, w, causal, scale, eps, out_scale = _op_args(torch.float32, True, True)
    out = torch.ops.diffattn.diff_attn(q, k, v, lam, w, causal, scale, eps, out_scale)[0]
    loss = out.square().sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    assert "diffattn::diff_attn_backward" in names
    assert not [n for n in names if n in ("aten::zeros", "aten::zero_", "aten::zeros_like")], names

    torch._dynamo.reset()
    graphs = []
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm),
                           bw_compiler=lambda gm, _: graphs.append(gm) or make_boxed_func(gm))
    f = torch.compile(lambda *a: diff_attn(*a[:3], a[3], causal=True, norm_weight=a[4]), backend=backend,
                      fullgraph=True)
    f(q, k, v, lam, w).square().sum().backward()
    (graph,) = graphs
    targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert "diffattn.diff_attn_backward.default" in targets
    assert not [t for t in targets if any(word in t for word in ("zeros", "fill", "full"))], targets


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_compile_fullgraph_forward_and_backward(causal):
    torch._dynamo.reset()
    B, H, N, d = 2, 2, 77, 32
    q, k, v = make_qkv(B, H, N, d, torch.float32, DEVICE, "linear", requires_grad=True)
    lam = torch.tensor(0.8, device=DEVICE, requires_grad=True)
    w = (1 + 0.1 * torch.randn(2 * d)).to(DEVICE).requires_grad_(True)

    def loss(q, k, v, lam, w):
        out = diff_attn(q, k, v, lam, causal=causal, norm_weight=w, out_scale=0.2)
        return out, out.square().sum()

    # AOTAutograd compiles the backward together with the forward graph; the gradient call runs that graph.
    compiled = torch.compile(loss, fullgraph=True, backend=BACKEND)
    out, total = compiled(q, k, v, lam, w)
    assert "CompiledFunction" in type(total.grad_fn).__name__
    grads = torch.autograd.grad(total, [q, k, v, lam, w])
    ref_leaves = [to64(x) for x in (q, k, v, lam, w)]
    ref = diff_attn_reference(*ref_leaves[:4], causal=causal, norm_weight=ref_leaves[4], out_scale=0.2)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    assert_close(out, ref, torch.float32, FWD, "out")
    for name, a, b in zip(["dq", "dk", "dv", "dlam", "dw"], grads, ref_grads):
        assert a.shape == b.shape, name
        assert_close(a, b, torch.float32, BWD, name)


def test_compile_dynamic_reuses_one_graph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(BACKEND)

    def f(q, k, v, lam):
        return diff_attn(q, k, v, lam, causal=True)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    lam = torch.tensor(0.5, device=DEVICE)
    counts = []
    for N in (33, 50, 77):
        q, k, v = make_qkv(2, 2, N, 16, torch.float32, DEVICE)
        out = compiled(q, k, v, lam)
        ref = diff_attn_reference(to64(q), to64(k), to64(v), 0.5, causal=True)
        assert_close(out, ref, torch.float32, FWD, f"N={N}")
        counts.append(counter.frame_count)
    # The first call may compile twice (Dynamo restarts once to specialise the float arguments); later sequence
    # lengths must not compile again.
    assert counts[0] >= 1 and counts[1:] == [counts[0]] * 2, f"backend compiles after each call: {counts}"


def test_compile_keeps_python_number_and_per_head_lambdas():
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 3, 20, 16, torch.float32, DEVICE)
    lam_h = torch.tensor([0.1, 0.5, 0.9], device=DEVICE)
    for lam in (0.25, lam_h):
        out = torch.compile(lambda q, k, v: diff_attn(q, k, v, lam), fullgraph=True, backend=BACKEND)(q, k, v)
        ref = diff_attn_reference(to64(q), to64(k), to64(v), to64(lam))
        assert_close(out, ref, torch.float32, FWD, f"lam={lam}")


def test_backend_checks_trace_for_a_cuda_device():
    """The availability checks the wrapper and the model run on every call must trace under fullgraph for a CUDA
    tensor's device too. The first H200 run found torch 2.11's Dynamo refusing `importlib.util.find_spec` there
    (CPU CI, on the interpreter branch and a newer torch, had passed); it is now looked up once, at import."""
    cuda = torch.device("cuda")

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        ok = kernels.triton_available() and kernels.triton_unavailable_reason(cuda) is None
        return x + (1 if ok else 2)

    f(torch.ones(2))


def test_eager_errors_unchanged_by_registration():
    q, k, v = make_qkv(1, 1, 8, 16, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="v must have shape"):
        diff_attn(q, k, v[..., :16], 0.5)
    with pytest.raises(ValueError, match="lam must be finite"):
        diff_attn(q, k, v, torch.tensor(float("nan")))


def test_compiled_call_reports_the_validation_message():
    """Under fullgraph=True Dynamo wraps a user error in its own exception; our message must still be in it."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 1, 8, 16, torch.float32, DEVICE)
    f = torch.compile(lambda q, k, v: diff_attn(q, k, v, 0.5), fullgraph=True, backend=BACKEND)
    with pytest.raises(Exception, match=r"v must have shape \(B, Hkv, N, 2d\)"):
        f(q, k, v[..., :16])


AUTOCAST_DTYPE = torch.float16 if DEVICE == "cpu" else torch.bfloat16  # the interpreter cannot do bf16


def test_autocast_computes_in_autocast_dtype():
    q, k, v = make_qkv(1, 2, 40, 32, torch.float32, DEVICE, requires_grad=True)
    lam = torch.tensor(0.6, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=AUTOCAST_DTYPE):
        out = diff_attn(q, k, v, lam, causal=True)
    assert out.dtype == AUTOCAST_DTYPE
    low = [t.detach().to(AUTOCAST_DTYPE) for t in (q, k, v)]
    expected = diff_attn(*low, lam.detach(), causal=True)
    assert torch.equal(out, expected)  # the same kernel on the cast inputs; λ stays fp32
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and lam.grad.dtype == torch.float32


def test_ops_namespace_is_documented():
    assert hasattr(torch.ops.diffattn, "diff_attn") and hasattr(torch.ops.diffattn, "diff_attn_backward")
    assert kernels.diff_attn.__doc__ and "torch.compile" in kernels.diff_attn.__doc__


def _cuda_inputs():
    q, k, v = make_qkv(4, 6, 197, 64, torch.bfloat16, "cuda", "linear", requires_grad=True)
    lam = torch.tensor(0.8, device="cuda", requires_grad=True)
    w = torch.ones(128, device="cuda", requires_grad=True)
    return [q, k, v, lam, w]


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_cuda_graph_capture_forward_and_backward():
    """No host synchronisation in forward or backward: after a warm-up (autotuning done), both capture in one
    CUDA graph and replay to the eager result."""
    leaves = _cuda_inputs()

    def step():
        for t in leaves:
            t.grad = None
        out = diff_attn(*leaves[:4], causal=True, norm_weight=leaves[4], out_scale=0.2)
        out.float().square().mean().backward()
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up: autotuning and compilation happen here, not during capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    eager_out = step().detach().clone()
    eager_grads = [t.grad.clone() for t in leaves]
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        static_out = diff_attn(*leaves[:4], causal=True, norm_weight=leaves[4], out_scale=0.2)
        static_out.float().square().mean().backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out, eager_out)
    for t, g in zip(leaves, eager_grads):
        assert torch.equal(t.grad, g)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="reduce-overhead mode uses CUDA graphs")
def test_compile_reduce_overhead():
    torch._dynamo.reset()
    q, k, v, lam, w = (t.detach() for t in _cuda_inputs())

    def f(q, k, v):
        return diff_attn(q, k, v, lam, causal=True, norm_weight=w, out_scale=0.2)

    want = f(q, k, v)  # also warms the autotuner up before any capture
    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # recorded on the first calls, replayed after
        got = compiled(q, k, v)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
