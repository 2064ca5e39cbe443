"""The `diffattn` PyTorch ops (torch.library) of the language-model forms, with fake (meta) implementations and the
varlen autograd formula registered on its forward op. The design is kernels/ops.py's (read its docstring for why):

    torch.ops.diffattn.diff_attn_varlen(q, k, v, lam, norm_weight, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, causal, scale, norm_eps, out_scale) -> (out, lse, o2, o_pre)
    torch.ops.diffattn.diff_attn_varlen_inference(...same...) -> out        # no saved state written
    torch.ops.diffattn.diff_attn_varlen_backward(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, cu_seqlens_q,
        cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, norm_eps, out_scale, needs_dlam, needs_dw)
        -> (dq, dk, dv, dlam, dw)
    torch.ops.diffattn.diff_attn_decode(q, k_cache, v_cache, lam, norm_weight, cache_seqlens, cache_leftpad,
                                        head_layout, scale, norm_eps, out_scale, num_splits) -> out

Varlen `lam` is a floating tensor broadcastable to (total_q, H), decode's to (B, H, Nq) (the public wrappers in
api_lm.py turn numbers, 0-d and (H,) lambdas into one); λ's gradient comes back in its own shape. Arguments are not
validated here: call `kernels.diff_attn_varlen` / `kernels.diff_attn_decode`, which validate and pick the op.

Eager calls skip the op machinery (`VarlenFunction` and `eager_varlen_inference` below, `decode.decode_fwd`); traced
calls (torch.compile, export, make_fx, fake tensors: `api._traced`) go through the ops. Both run the same
`_varlen_forward` / `_varlen_backward_impl`, so they agree bit for bit. Like the dense ops, these are `custom_op`s
(one opaque node; our own launch policy in Python) and read no tensor contents on the host: the kernels take
cu_seqlens and cache_seqlens on the device, and the grids are sized by the max_seqlen ints.
"""

# No `from __future__ import annotations`: custom_op reads the schema from the annotations at runtime.
from typing import Optional

import torch
from torch import Tensor

from .decode import decode_fwd
from .varlen import varlen_fwd
from .varlen_bwd import varlen_bwd


def _varlen_forward(q, k, v, lam, norm_weight, cu_q, cu_k, max_q, causal, scale, norm_eps, out_scale, save):
    return varlen_fwd(q, k, v, lam, norm_weight, cu_q, cu_k, max_q, causal=causal, scale=scale, norm_eps=norm_eps,
                      out_scale=out_scale, save_for_bwd=save)


def _varlen_backward_impl(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, cu_q, cu_k, max_q, max_k, causal, scale,
                          norm_eps, out_scale, needs_dlam, needs_dw):
    """(dq, dk, dv, dlam or None, dw or None): dlam summed back to λ's own shape and dtype (contiguous, as the
    fake implementation promises: per-token λ's gradient comes out of the kernel transposed)."""
    dq, dk, dv, dlam, dw = varlen_bwd(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, cu_q, cu_k, max_q, max_k,
                                      causal=causal, scale=scale, norm_eps=norm_eps, out_scale=out_scale,
                                      needs_dlam=needs_dlam, needs_dw=needs_dw and norm_weight is not None)
    dlam = dlam.sum_to_size(lam.shape).to(lam.dtype).contiguous() if dlam is not None else None
    return dq, dk, dv, dlam, dw


def _fake_varlen_out(q: Tensor) -> Tensor:
    total_q, H2, d = q.shape
    return q.new_empty(total_q, H2 // 2, 2 * d)


@torch.library.custom_op("diffattn::diff_attn_varlen", mutates_args=())
def diff_attn_varlen_op(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, norm_weight: Optional[Tensor],
                        cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                        causal: bool, scale: float, norm_eps: float, out_scale: float
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Forward that also returns what the backward needs: (out, lse, o2, o_pre); o_pre is empty without the norm."""
    out, lse, o2, o_pre = _varlen_forward(q, k, v, lam, norm_weight, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          causal, scale, norm_eps, out_scale, True)
    return out, lse, o2, o_pre if o_pre is not None else q.new_empty(0)


@diff_attn_varlen_op.register_fake
def _varlen_fake(q, k, v, lam, norm_weight, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                 norm_eps, out_scale):
    total_q, H2, d = q.shape
    lse = q.new_empty(H2, total_q, dtype=torch.float32)  # head-major: see varlen.py
    o2 = q.new_empty(H2 // 2, total_q, 2 * d)
    o_pre = q.new_empty(H2 // 2, total_q, 2 * d) if norm_weight is not None else q.new_empty(0)
    return _fake_varlen_out(q), lse, o2, o_pre


@torch.library.custom_op("diffattn::diff_attn_varlen_inference", mutates_args=())
def diff_attn_varlen_inference_op(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, norm_weight: Optional[Tensor],
                                  cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                  causal: bool, scale: float, norm_eps: float, out_scale: float) -> Tensor:
    """Forward without saved state (no gradient needed): writes the output only."""
    return _varlen_forward(q, k, v, lam, norm_weight, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal, scale,
                           norm_eps, out_scale, False)[0]


@diff_attn_varlen_inference_op.register_fake
def _varlen_inference_fake(q, k, v, lam, norm_weight, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           causal, scale, norm_eps, out_scale):
    return _fake_varlen_out(q)


@torch.library.custom_op("diffattn::diff_attn_varlen_backward", mutates_args=())
def diff_attn_varlen_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, lam: Tensor,
                                 norm_weight: Optional[Tensor], o_ref: Tensor, o2: Tensor, lse: Tensor,
                                 cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                 causal: bool, scale: float, norm_eps: float, out_scale: float, needs_dlam: bool,
                                 needs_dw: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dlam, dw): dlam in λ's shape and dtype, dw in the norm weight's; each empty when not needed."""
    dq, dk, dv, dlam, dw = _varlen_backward_impl(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, cu_seqlens_q,
                                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, norm_eps,
                                                 out_scale, needs_dlam, needs_dw)
    dlam = dlam if dlam is not None else lam.new_empty(0)
    dw = dw if dw is not None else q.new_empty(0, dtype=torch.float32)
    return dq, dk, dv, dlam, dw


@diff_attn_varlen_backward_op.register_fake
def _varlen_backward_fake(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, causal, scale, norm_eps, out_scale, needs_dlam, needs_dw):
    dlam = torch.empty_like(lam, memory_format=torch.contiguous_format) if needs_dlam else lam.new_empty(0)
    dw = (torch.empty_like(norm_weight, memory_format=torch.contiguous_format)
          if needs_dw and norm_weight is not None else q.new_empty(0, dtype=torch.float32))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dlam, dw


def _save(ctx, q, k, v, lam, norm_weight, cu_q, cu_k, out, lse, o2, o_pre, args):
    # O(total·d) state: inputs, the output (or the pre-norm difference), O2 and both LSE rows.
    ctx.save_for_backward(q, k, v, lam, norm_weight, out if norm_weight is None else o_pre, o2, lse, cu_q, cu_k)
    ctx.args = args


def _setup_context(ctx, inputs, output):
    q, k, v, lam, norm_weight, cu_q, cu_k, max_q, max_k, causal, scale, norm_eps, out_scale = inputs
    out, lse, o2, o_pre = output
    _save(ctx, q, k, v, lam, norm_weight, cu_q, cu_k, out, lse, o2, o_pre,
          (max_q, max_k, causal, scale, norm_eps, out_scale))
    ctx.mark_non_differentiable(lse, o2, o_pre)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for lse, o2, o_pre (see ops._setup_context)


DOUBLE_BACKWARD_ERROR = (
    "kernels.diff_attn_varlen has no double backward: a gradient computed with create_graph=True is being "
    "differentiated again. Use kernels.diff_attn_varlen_reference (plain PyTorch, twice differentiable) for that term"
)


def _grads(ctx, dout, backward):
    """The thirteen input gradients from the saved state, through `backward` (the op, or `_varlen_backward_impl`);
    under create_graph=True behind DelayedError, as `ops._grads` does and for the same reason (the gradients
    depend on the saved inputs, not only on dout: @once_differentiable would let a second derivative through as
    if they were constants)."""
    q, k, v, lam, norm_weight, o_ref, o2, lse, cu_q, cu_k = ctx.saved_tensors
    needs_dlam, needs_dw = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    with torch.no_grad():
        dq, dk, dv, dlam, dw = backward(dout, q, k, v, lam, norm_weight, o_ref, o2, lse, cu_q, cu_k, *ctx.args,
                                        needs_dlam, needs_dw)
    grads = (dq, dk, dv, dlam if needs_dlam else None, dw if needs_dw else None)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dout, q, k, v, lam, norm_weight)):
        grads = _delayed_error(grads)
    return (*grads,) + (None,) * 8


def _delayed_error(grads):
    """The gradients unchanged, each behind a DelayedError node that raises DOUBLE_BACKWARD_ERROR when
    differentiated (PyTorch's own mechanism for @once_differentiable)."""
    present = [g.detach().requires_grad_(True) for g in grads if g is not None]
    out = iter(torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR, len(present))(*present))
    return tuple(next(out) if g is not None else None for g in grads)


def _backward(ctx, dout, _dlse, _do2, _dopre):
    return _grads(ctx, dout, torch.ops.diffattn.diff_attn_varlen_backward)


diff_attn_varlen_op.register_autograd(_backward, setup_context=_setup_context)


class VarlenFunction(torch.autograd.Function):
    """The eager path of `kernels.diff_attn_varlen` with gradients: the op's forward, saved state and backward
    without the custom-op dispatch; returns the output only."""

    @staticmethod
    def forward(ctx, q, k, v, lam, norm_weight, cu_q, cu_k, max_q, max_k, causal, scale, norm_eps, out_scale):
        out, lse, o2, o_pre = _varlen_forward(q, k, v, lam, norm_weight, cu_q, cu_k, max_q, causal, scale, norm_eps,
                                              out_scale, True)
        _save(ctx, q, k, v, lam, norm_weight, cu_q, cu_k, out, lse, o2, o_pre,
              (max_q, max_k, causal, scale, norm_eps, out_scale))
        return out

    @staticmethod
    def backward(ctx, dout):
        return _grads(ctx, dout, _varlen_backward_impl)


def eager_varlen_inference(q, k, v, lam, norm_weight, cu_q, cu_k, max_q, max_k, causal, scale, norm_eps,
                           out_scale):
    """The eager path without gradients: no saved state."""
    return _varlen_forward(q, k, v, lam, norm_weight, cu_q, cu_k, max_q, causal, scale, norm_eps, out_scale, False)[0]


@torch.library.custom_op("diffattn::diff_attn_decode", mutates_args=())
def diff_attn_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lam: Tensor, norm_weight: Optional[Tensor],
                        cache_seqlens: Tensor, cache_leftpad: Optional[Tensor], head_layout: str, scale: float,
                        norm_eps: float, out_scale: float, num_splits: Optional[int]) -> Tensor:
    """`decode.decode_fwd` (forward only: decoding has no backward)."""
    return decode_fwd(q, k_cache, v_cache, lam, norm_weight, cache_seqlens, scale=scale, norm_eps=norm_eps,
                      out_scale=out_scale, num_splits=num_splits, cache_leftpad=cache_leftpad,
                      head_layout=head_layout)


@diff_attn_decode_op.register_fake
def _decode_fake(q, k_cache, v_cache, lam, norm_weight, cache_seqlens, cache_leftpad, head_layout, scale, norm_eps,
                 out_scale, num_splits):
    B, H2, Nq, d = q.shape
    return q.new_empty(B, Nq, H2 // 2, 2 * d).transpose(1, 2)  # the kernel's layout: a view of (B, Nq, H, 2d)
