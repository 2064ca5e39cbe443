"""`torch.autograd.Function` binding the forward and backward kernels."""

from __future__ import annotations

import torch

from .fwd import diff_attn_fwd


class DiffAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lam_bhn, norm_weight, causal, scale, norm_eps, out_scale, grad_enabled):
        # ctx.needs_input_grad reflects requires_grad even under torch.no_grad(), hence the caller's grad mode:
        # inference with trainable parameters (a model's norm weight) writes nothing for the backward.
        needs_grad = grad_enabled and any(ctx.needs_input_grad[:5])
        out, lse, o2, o_pre = diff_attn_fwd(
            q, k, v, lam_bhn, norm_weight, causal=causal, scale=scale, norm_eps=norm_eps, out_scale=out_scale,
            save_for_bwd=needs_grad,
        )
        if needs_grad:
            # Saved state is O(N·d): inputs, the output (or pre-norm difference), O2 and two LSE rows.
            ctx.save_for_backward(q, k, v, lam_bhn, norm_weight, out if o_pre is None else o_pre, o2, lse)
            ctx.causal, ctx.scale, ctx.norm_eps, ctx.out_scale = causal, scale, norm_eps, out_scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from .bwd import diff_attn_bwd

        q, k, v, lam_bhn, norm_weight, o_pre, o2, lse = ctx.saved_tensors
        dq, dk, dv, dlam, dw = diff_attn_bwd(
            dout, q, k, v, lam_bhn, norm_weight, o_pre, o2, lse,
            causal=ctx.causal, scale=ctx.scale, norm_eps=ctx.norm_eps, out_scale=ctx.out_scale,
            needs_dlam=ctx.needs_input_grad[3], needs_dw=ctx.needs_input_grad[4],
        )
        return dq, dk, dv, dlam, dw, None, None, None, None, None
