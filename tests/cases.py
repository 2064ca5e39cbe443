"""Shared builders for kernel tests: fresh random inputs in the layouts a model produces."""

import torch


def make_qkv(B, H, N, d, dtype, device, layout="contiguous", requires_grad=False, seed=0):
    """q, k: (B, 2H, N, d); v: (B, H, N, 2d).

    layout: "contiguous"; "linear" (views of (B, N, 2H·d) projections, transposed: what a model feeds in);
    "fused" (slices of one (B, N, 3, ·) qkv buffer: non-dense strides).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    if layout == "contiguous":
        q, k, v = rnd(B, 2 * H, N, d), rnd(B, 2 * H, N, d), rnd(B, H, N, 2 * d)
        q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    elif layout == "linear":
        q = rnd(B, N, 2 * H * d).to(device=device, dtype=dtype).view(B, N, 2 * H, d).transpose(1, 2)
        k = rnd(B, N, 2 * H * d).to(device=device, dtype=dtype).view(B, N, 2 * H, d).transpose(1, 2)
        v = rnd(B, N, 2 * H * d).to(device=device, dtype=dtype).view(B, N, H, 2 * d).transpose(1, 2)
    elif layout == "fused":
        qkv = rnd(B, N, 3, 2 * H * d).to(device=device, dtype=dtype)
        q = qkv[:, :, 0].view(B, N, 2 * H, d).transpose(1, 2)
        k = qkv[:, :, 1].view(B, N, 2 * H, d).transpose(1, 2)
        v = qkv[:, :, 2].view(B, N, H, 2 * d).transpose(1, 2)
        if requires_grad:  # leaves are needed for .grad; keep the strides by detaching the views
            q, k, v = (t.detach() for t in (q, k, v))
    else:
        raise ValueError(layout)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def make_lam(kind, value, B, H, N, device, requires_grad=False, seed=1):
    """λ of one kind around `value`; exact 0 stays 0 in every kind (λ = 0 is a case of its own)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "float":
        return float(value)
    if kind == "scalar":
        lam = torch.tensor(value, dtype=torch.float32)
    elif kind == "head":
        lam = value * (1 + 0.25 * torch.arange(H, dtype=torch.float32) / H)
    elif kind == "token":
        lam = value * (1 + 0.25 * torch.rand(B, H, N, generator=g))
    else:
        raise ValueError(kind)
    return lam.to(device).requires_grad_(requires_grad)


def to64(x):
    if isinstance(x, torch.Tensor):
        return x.detach().double().requires_grad_(x.requires_grad)
    return x


def make_layout_qkv(B, H, Hkv, N, d, dtype, device, head_layout="interleaved", requires_grad=False, seed=0,
                    token_major=False):
    """q (B, 2H, N, d) and the k, v of `head_layout` with Hkv key/value groups (kernels.diff_attn's docstring):
    interleaved k (B, 2Hkv, N, d), v (B, Hkv, N, 2d); halves k, v (B, 2Hkv, N, d); v2 k, v (B, Hkv, N, d).
    token_major: transposed views of (B, N, heads·width) projections (what a model feeds in) instead of contiguous
    tensors."""
    g = torch.Generator().manual_seed(seed)
    k_heads = Hkv if head_layout == "v2" else 2 * Hkv
    v_shape = {"interleaved": (Hkv, 2 * d), "halves": (2 * Hkv, d), "v2": (Hkv, d)}[head_layout]

    def rnd(heads, width):
        if token_major:
            x = torch.randn(B, N, heads * width, generator=g).to(device=device, dtype=dtype)
            return x.view(B, N, heads, width).transpose(1, 2)
        return torch.randn(B, heads, N, width, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(2 * H, d), rnd(k_heads, d), rnd(*v_shape)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def call_with_leaves(fn, leaves, kw):
    """fn(q, k, v, lam, norm_weight=..., **kw) with leaves = [q, k, v, lam] or [q, k, v, lam, norm_weight]."""
    return fn(*leaves[:4], norm_weight=leaves[4] if len(leaves) > 4 else None, **kw)


def grads_of(fn, leaves, kw, dout):
    """The gradients of every leaf of `call_with_leaves(fn, leaves, kw)` against the output gradient `dout`."""
    return torch.autograd.grad(call_with_leaves(fn, leaves, kw), leaves, dout)
