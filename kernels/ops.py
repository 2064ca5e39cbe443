"""The `diffattn` PyTorch ops (torch.library): forward, inference-only forward and backward, with fake (meta)
implementations and the autograd formula registered on the forward op.

    torch.ops.diffattn.diff_attn(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale,
                                 head_layout="interleaved")
        -> (out, lse, o2, o_pre)        # out first; the rest is the state the backward needs
    torch.ops.diffattn.diff_attn_inference(...same...) -> out     # no saved state written
    torch.ops.diffattn.diff_attn_backward(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, causal, scale,
                                          norm_eps, out_scale, needs_dlam, needs_dw, head_layout="interleaved")
        -> (dq, dk, dv, dlam, dw)

`head_layout` (a str, so that torch.compile traces it as a constant) is one of validate.HEAD_LAYOUTS; dk and dv
come back in k's and v's shapes (GQA: summed over each group's diff-heads), out/o2/o_pre are (B, H, N, w) with
w = 2d (d for "v2").

`lam` is a floating tensor broadcastable to (B, H, N) (the public wrapper `kernels.diff_attn` turns numbers, 0-d and
(H,) lambdas into one); its gradient comes back in its own shape. Arguments are not validated here: call
`kernels.diff_attn`, which validates, applies autocast and picks the inference op when no gradient is needed.

Eager calls skip the op machinery: `kernels.diff_attn` runs `DiffAttnFunction` (a plain autograd.Function over the
same `_forward` / `_backward_impl`) unless it is being traced (torch.compile, export, make_fx, fake tensors), where
the ops are required. The custom-op dispatch and its generated autograd cost about 3x the host time of the direct
path per forward+backward (CPU measurement with the launches stubbed: ~290 vs ~90 µs), and the first H200 run
suggests (not yet measured) that small-N calls are bound by host time. Both paths run the same functions, so they
agree bit for bit.

Why `custom_op` rather than `triton_op` + `wrap_triton`: every launch goes through our own policy in Python
(kernels/configs.py: autotuned, fixed or forced configs, pruned through a side table, under a device guard), which
wrap_triton would have Inductor trace and re-implement. A custom op stays one opaque node: Dynamo and AOTAutograd
see its fake implementation, Inductor calls it as an extern kernel, and CUDA graphs capture its launches once the
autotuner has warmed up (no host synchronisation in forward or backward).
"""

# No `from __future__ import annotations`: custom_op reads the schema from the annotations at runtime.
from typing import Optional

import torch
from torch import Tensor

from .bwd import diff_attn_bwd
from .fwd import diff_attn_fwd
from .layouts import value_width


def _lam_bhn(lam: Tensor, q: Tensor) -> Tensor:
    B, H2, N, _ = q.shape
    return torch.broadcast_to(lam, (B, H2 // 2, N))  # a view: stride 0 where λ broadcasts


def _forward(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout, save):
    return diff_attn_fwd(q, k, v, _lam_bhn(lam, q), norm_weight, causal=causal, scale=scale, norm_eps=norm_eps,
                         out_scale=out_scale, save_for_bwd=save, head_layout=head_layout)


def _backward_impl(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, causal, scale, norm_eps, out_scale, needs_dlam,
                   needs_dw, head_layout="interleaved"):
    """(dq, dk, dv, dlam or None, dw or None): dlam summed back to λ's own shape and dtype."""
    dq, dk, dv, dlam, dw = diff_attn_bwd(
        dout, q, k, v, _lam_bhn(lam, q), norm_weight, o_ref, o2, lse, causal=causal, scale=scale,
        norm_eps=norm_eps, out_scale=out_scale, needs_dlam=needs_dlam, needs_dw=needs_dw and norm_weight is not None,
        head_layout=head_layout,
    )
    dlam = dlam.sum_to_size(lam.shape).to(lam.dtype) if dlam is not None else None
    return dq, dk, dv, dlam, dw


def _fake_out(q: Tensor, head_layout: str) -> Tensor:
    B, H2, N, d = q.shape
    # the kernel's layout: a view of (B, N, H, w)
    return q.new_empty(B, N, H2 // 2, value_width(d, head_layout)).transpose(1, 2)


@torch.library.custom_op("diffattn::diff_attn", mutates_args=())
def diff_attn_op(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, norm_weight: Optional[Tensor], causal: bool,
                 scale: float, norm_eps: float, out_scale: float, head_layout: str = "interleaved"
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward that also returns what the backward needs: (out, lse, o2, o_pre); o_pre is empty without the norm
    (the backward then uses out itself)."""
    out, lse, o2, o_pre = _forward(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout, True)
    return out, lse, o2, o_pre if o_pre is not None else q.new_empty(0)


@diff_attn_op.register_fake
def _diff_attn_fake(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout="interleaved"):
    B, H2, N, d = q.shape
    width = value_width(d, head_layout)
    lse = q.new_empty(B, H2, N, dtype=torch.float32)
    o2 = q.new_empty(B, H2 // 2, N, width)
    o_pre = q.new_empty(B, H2 // 2, N, width) if norm_weight is not None else q.new_empty(0)
    return _fake_out(q, head_layout), lse, o2, o_pre


@torch.library.custom_op("diffattn::diff_attn_inference", mutates_args=())
def diff_attn_inference_op(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, norm_weight: Optional[Tensor],
                           causal: bool, scale: float, norm_eps: float, out_scale: float,
                           head_layout: str = "interleaved") -> Tensor:
    """Forward without saved state (no gradient needed): writes the output only."""
    return _forward(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout, False)[0]


@diff_attn_inference_op.register_fake
def _diff_attn_inference_fake(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale,
                              head_layout="interleaved"):
    return _fake_out(q, head_layout)


@torch.library.custom_op("diffattn::diff_attn_backward", mutates_args=())
def diff_attn_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor, norm_weight: Optional[Tensor],
                          o_ref: Tensor, o2: Tensor, lse: Tensor, causal: bool, scale: float, norm_eps: float,
                          out_scale: float, needs_dlam: bool, needs_dw: bool, head_layout: str = "interleaved"
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dlam, dw): dlam in λ's shape and dtype, dw in the norm weight's; each empty when not needed."""
    dq, dk, dv, dlam, dw = _backward_impl(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, causal, scale, norm_eps,
                                          out_scale, needs_dlam, needs_dw, head_layout)
    dlam = dlam if dlam is not None else lam.new_empty(0)
    dw = dw if dw is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dlam, dw


@diff_attn_backward_op.register_fake
def _diff_attn_backward_fake(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, causal, scale, norm_eps, out_scale,
                             needs_dlam, needs_dw, head_layout="interleaved"):
    dlam = torch.empty_like(lam, memory_format=torch.contiguous_format) if needs_dlam else lam.new_empty(0)
    dw = (torch.empty_like(norm_weight, memory_format=torch.contiguous_format)
          if needs_dw and norm_weight is not None else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dlam, dw


def _save(ctx, q, k, v, lam, norm_weight, out, lse, o2, o_pre, args, head_layout):
    # Saved state is O(N·d): inputs, the output (or the pre-norm difference), O2 and two LSE rows.
    ctx.save_for_backward(q, k, v, lam, norm_weight, out if norm_weight is None else o_pre, o2, lse)
    ctx.args = args
    ctx.head_layout = head_layout


def _setup_context(ctx, inputs, output):
    q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, *layout = inputs
    out, lse, o2, o_pre = output
    _save(ctx, q, k, v, lam, norm_weight, out, lse, o2, o_pre, (causal, scale, norm_eps, out_scale),
          layout[0] if layout else "interleaved")
    ctx.mark_non_differentiable(lse, o2, o_pre)
    # lse, o2 and o_pre never receive a gradient: without this, autograd would allocate and zero-fill one of their
    # size per backward only for `_backward` to ignore it (3 x (B, H, N, 2d)-sized buffers).
    ctx.set_materialize_grads(False)


DOUBLE_BACKWARD_ERROR = (
    "kernels.diff_attn has no double backward: a gradient computed with create_graph=True is being "
    "differentiated again (a gradient penalty, R1, a Jacobian or Hessian term). Use kernels.diff_attn_reference "
    "(plain PyTorch, twice differentiable) for that term"
)


def _grads(ctx, dout, backward):
    """The nine input gradients from the saved state, through `backward` (the op, or `_backward_impl`).

    The kernels' gradients are not differentiable themselves. Under create_graph=True they are returned through
    PyTorch's DelayedError node (what @once_differentiable uses, with our message): the first-order gradients are
    unchanged, and differentiating them again raises DOUBLE_BACKWARD_ERROR instead of silently treating them as
    constants. Both paths (the op and the eager Function) go through here, so both raise the same error.
    """
    q, k, v, lam, norm_weight, o_ref, o2, lse = ctx.saved_tensors
    needs_dlam, needs_dw = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    with torch.no_grad():  # no autograd node for the backward op itself (it has no formula)
        dq, dk, dv, dlam, dw = backward(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, *ctx.args, needs_dlam,
                                        needs_dw, ctx.head_layout)
    grads = (dq, dk, dv, dlam if needs_dlam else None, dw if needs_dw else None)
    # The gradients depend on dout and on every saved input (not only on dout, which is all @once_differentiable
    # looks at): with `out.sum()` as the loss dout is a constant, yet dq still depends on q, k, v.
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dout, q, k, v, lam, norm_weight)):
        grads = _double_backward_error(grads)
    return (*grads, None, None, None, None, None)  # causal, scale, norm_eps, out_scale, head_layout


def _double_backward_error(grads):
    present = [g for g in grads if g is not None]
    aliases = []
    for g in present:  # DelayedError needs inputs that require grad to give its outputs a grad_fn
        g = g.detach()
        g.requires_grad_(True)
        aliases.append(g)
    out = iter(torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR, len(aliases))(*aliases))
    return tuple(next(out) if g is not None else None for g in grads)


def _backward(ctx, dout, _dlse, _do2, _dopre):
    # Only `out` is differentiable, and this runs only when some output has a gradient: dout is not None even
    # without materialised gradients.
    return _grads(ctx, dout, torch.ops.diffattn.diff_attn_backward)


diff_attn_op.register_autograd(_backward, setup_context=_setup_context)


class DiffAttnFunction(torch.autograd.Function):
    """The eager path of `kernels.diff_attn` (see the module docstring): the op's forward, saved state and backward
    without the custom-op dispatch; returns the output only. Written in the ctx-in-forward form: the setup_context
    form, returning the op's four outputs, measured ~70 µs more host time per forward+backward."""

    @staticmethod
    def forward(ctx, q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout="interleaved"):
        out, lse, o2, o_pre = _forward(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout,
                                       True)
        _save(ctx, q, k, v, lam, norm_weight, out, lse, o2, o_pre, (causal, scale, norm_eps, out_scale), head_layout)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _grads(ctx, dout, _backward_impl)


def eager_inference(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout):
    """The eager path without gradients: `diff_attn_inference`'s forward, no saved state."""
    return _forward(q, k, v, lam, norm_weight, causal, scale, norm_eps, out_scale, head_layout, False)[0]
