"""Building blocks shared by both encoders: fp32 LayerNorm, the differential attention module, MLPs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import backends


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activation dtype (as CLIP does), cast back after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNormWeight(nn.Module):
    """Holds DiffCLIP's `diff_norm.weight`; the norm itself runs inside the attention backend (fused for triton)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class DiffAttention(nn.Module):
    """Differential multi-head attention, the one class both encoders use.

    q, k are split into `heads` heads of `head_dim`; v into heads/2 heads of 2·head_dim. Diff-head h subtracts
    λ times the map of query/key head 2h+1 from that of head 2h. λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, one
    per layer, in fp32. The output is RMS-normalised per diff-head (weight `diff_norm.weight`) and scaled by
    1 − λ_init before `out_proj`.
    """

    def __init__(self, width: int, heads: int, lambda_init: float, causal: bool, backend: str = "auto"):
        super().__init__()
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.lambda_init, self.causal = float(lambda_init), causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.randn(self.head_dim) * 0.1))
        self.diff_norm = RMSNormWeight(2 * self.head_dim, eps=1e-5)
        self.backend = backend  # a name from backends.NAMES, set by the model
        # Called with the combined map A = P1 − λ·P2 (B, heads/2, N, N) of each forward, the tensor that multiplies
        # V (see kernels.diff_attn_reference); needs the eager backend, the only one that materialises it.
        # Set and cleared by diffclip.explain.
        self.attn_hook = None

    def lam(self) -> torch.Tensor:
        """λ as a 0-d fp32 tensor on the parameters' device (no host sync)."""
        l1 = torch.exp(torch.sum(self.lambda_q1.float() * self.lambda_k1.float()))
        l2 = torch.exp(torch.sum(self.lambda_q2.float() * self.lambda_k2.float()))
        return l1 - l2 + self.lambda_init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, d = self.heads, self.head_dim
        # Views of the projections, no copies: every backend takes strided (B, heads, N, d) inputs. V has half the
        # heads at twice the width: diff-head i pairs query/key heads 2i and 2i+1 with value head i.
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=h)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=h)
        v = rearrange(self.v_proj(x), "b n (h e) -> b h n e", h=h // 2)
        name = backends.resolve(self.backend, x.device, d, x.dtype)
        hook = {}
        if self.attn_hook is not None:
            if name != "eager":
                raise RuntimeError(f"an attention-map hook needs the eager backend (the only one that materialises "
                                   f"the map); this layer runs {name!r}")
            hook["attn_hook"] = self.attn_hook
        o = backends.get(name)(
            q, k, v, self.lam(), causal=self.causal, norm_weight=self.diff_norm.weight,
            norm_eps=self.diff_norm.eps, out_scale=1.0 - self.lambda_init, **hook,
        )
        # triton returns a transposed view of a (B, N, H, 2d) buffer: this rearrange is a view, not a copy.
        return self.out_proj(rearrange(o, "b h n e -> b n (h e)"))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class VisionMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TextMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(width, hidden), QuickGELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))
