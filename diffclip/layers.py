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


_QKV = ("q_proj", "k_proj", "v_proj")


class DiffAttention(nn.Module):
    """Differential multi-head attention, the one class both encoders use.

    q, k are split into `heads` heads of `head_dim`; v into heads/2 heads of 2·head_dim. Diff-head h subtracts
    λ times the map of query/key head 2h+1 from that of head 2h. λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init, one
    per layer, in fp32. The output is RMS-normalised per diff-head (weight `diff_norm.weight`) and scaled by
    1 − λ_init before `out_proj`.

    The q, k and v projections are one packed `qkv_proj` (rows q, k, v): one GEMM forward and one input-gradient
    GEMM backward instead of three each (and no sum of three input gradients). State dicts keep the official
    `q_proj.*`, `k_proj.*`, `v_proj.*` keys both ways (the hooks below), so checkpoints load and save unchanged.
    """

    def __init__(self, width: int, heads: int, lambda_init: float, causal: bool, backend: str = "auto"):
        super().__init__()
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.lambda_init, self.causal = float(lambda_init), causal
        self.qkv_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
            setattr(self, name, nn.Parameter(torch.randn(self.head_dim) * 0.1))
        self.diff_norm = RMSNormWeight(2 * self.head_dim, eps=1e-5)
        self.backend = backend  # a name from backends.NAMES, set by the model
        # Called with the combined map A = P1 − λ·P2 (B, heads/2, N, N) of each forward, the tensor that multiplies
        # V (see kernels.diff_attn_reference); needs the eager backend, the only one that materialises it.
        # Set and cleared by diffclip.explain.
        self.attn_hook = None
        self.register_load_state_dict_pre_hook(_pack_qkv)
        self.register_state_dict_post_hook(_unpack_qkv)

    def lam(self) -> torch.Tensor:
        """λ as a 0-d fp32 tensor on the parameters' device (no host sync). The encoders compute every layer's λ
        at once (`tower_lambdas`); this is for a layer used on its own."""
        return tower_lambdas([self])[0]

    def projections(self, x: torch.Tensor):
        """q, k (B, heads, N, d) and v (B, heads/2, N, 2d): strided views of one packed projection, no copies
        (every backend takes strided inputs). Diff-head i pairs query/key heads 2i and 2i+1 with value head i."""
        h = self.heads
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return (rearrange(q, "b n (h d) -> b h n d", h=h), rearrange(k, "b n (h d) -> b h n d", h=h),
                rearrange(v, "b n (h e) -> b h n e", h=h // 2))

    def forward(self, x: torch.Tensor, lam: torch.Tensor | None = None) -> torch.Tensor:
        """`lam`: this layer's λ when the encoder computed it with the others' (`tower_lambdas`), else None."""
        q, k, v = self.projections(x)
        name = backends.resolve(self.backend, x.device, self.head_dim, x.dtype)
        hook = {}
        if self.attn_hook is not None:
            if name != "eager":
                raise RuntimeError(f"an attention-map hook needs the eager backend (the only one that materialises "
                                   f"the map); this layer runs {name!r}")
            hook["attn_hook"] = self.attn_hook
        o = backends.get(name)(
            q, k, v, self.lam() if lam is None else lam, causal=self.causal, norm_weight=self.diff_norm.weight,
            norm_eps=self.diff_norm.eps, out_scale=1.0 - self.lambda_init, **hook,
        )
        # triton returns a transposed view of a (B, N, H, 2d) buffer: this rearrange is a view, not a copy.
        return self.out_proj(rearrange(o, "b h n e -> b n (h e)"))


def tower_lambdas(layers) -> tuple:
    """Every layer's λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init in one batch of ops (0-d fp32 tensors, in order).

    One layer's λ costs about ten tiny kernels forward and as many backward; an encoder computes all of its
    layers' at once instead (stack the vectors, one product, sum, exp, difference: a fixed handful of kernels per
    encoder and step, forward and backward, plus one scalar add per layer). Same arithmetic as per layer, in fp32.
    λ_init is added as a Python number: a tensor of them would be cast with the model's dtype (bf16 rounds 0.8)."""
    q = torch.stack([m.lambda_q1 for m in layers] + [m.lambda_q2 for m in layers]).float()
    k = torch.stack([m.lambda_k1 for m in layers] + [m.lambda_k2 for m in layers]).float()
    e1, e2 = torch.exp((q * k).sum(-1)).view(2, len(layers)).unbind(0)
    return tuple(diff + m.lambda_init for diff, m in zip((e1 - e2).unbind(0), layers))


def _pack_qkv(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Official `q_proj/k_proj/v_proj` weights and biases -> the packed `qkv_proj` (when all three are present;
    otherwise left as they are for load_state_dict / check_keys to report)."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in _QKV]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}qkv_proj.{kind}"] = torch.cat([state_dict.pop(key) for key in keys])


def _unpack_qkv(module, state_dict, prefix, local_metadata):
    """The packed projection -> the official keys (copies, so no two saved tensors share storage: safetensors
    refuses shared tensors)."""
    for kind in ("weight", "bias"):
        packed = state_dict.pop(f"{prefix}qkv_proj.{kind}", None)
        if packed is not None:
            for name, part in zip(_QKV, packed.chunk(3)):
                state_dict[f"{prefix}{name}.{kind}"] = part.clone()


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
