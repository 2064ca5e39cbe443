"""The "no differential attention" reference row: the same CLIP ViT-B/16 widths and depths, with standard
multi-head attention through one SDPA call. Built from DiffCLIP by swapping each attention module, so nothing but
the attention differs."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from diffclip import DiffCLIP, DiffCLIPConfig
from diffclip.layers import DiffAttention


class PlainAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, lam=None):  # (the blocks pass DiffCLIP's λ; None here)
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))


def plain_clip(config: DiffCLIPConfig) -> DiffCLIP:
    model = DiffCLIP(config, attn_backend="sdpa")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DiffAttention):
                setattr(parent, name, PlainAttention(child.width, child.heads, child.causal))
    return model
