"""DiffCLIP: a CLIP ViT-B/16 whose attention layers, in both encoders, are differential attention.

Parameter names match the official checkpoints key for key (`visual.*`, `transformer.resblocks.*`, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import backends
from .config import DiffCLIPConfig
from .layers import DiffAttention, LayerNorm, TextMlp, VisionMlp


class VisionBlock(nn.Module):
    def __init__(self, width, heads, lambda_init):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=1e-5)
        self.attn = DiffAttention(width, heads, lambda_init, causal=False)
        self.norm2 = LayerNorm(width, eps=1e-5)
        self.mlp = VisionMlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextBlock(nn.Module):
    def __init__(self, width, heads, lambda_init):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=1e-5)
        self.attn = DiffAttention(width, heads, lambda_init, causal=True)
        self.ln_2 = LayerNorm(width, eps=1e-5)
        self.mlp = TextMlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, width):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, grid², width)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: DiffCLIPConfig):
        super().__init__()
        w = cfg.vision_width
        n_patches = (cfg.vision_img_size // cfg.vision_patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg.vision_patch_size, w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, w) * 0.02)
        self.blocks = nn.ModuleList(
            VisionBlock(w, cfg.vision_heads, cfg.lambda_init_for(i)) for i in range(cfg.vision_depth)
        )
        self.norm = LayerNorm(w, eps=1e-5)

    def forward(self, image):
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


class DiffCLIP(nn.Module):
    """DiffCLIP with a swappable attention backend.

    Args:
        config: sizes (`DiffCLIPConfig.vit_b16()` for the released models).
        attn_backend: "eager", "sdpa", "triton" or "auto"; None reads $DIFFCLIP_ATTN_BACKEND, else "auto".
    """

    def __init__(self, config: DiffCLIPConfig, attn_backend: str | None = None):
        super().__init__()
        self.config = config
        c = config
        self.visual = VisionTransformer(c)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(c.context_length, c.text_width) * 0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            TextBlock(c.text_width, c.text_heads, c.lambda_init_for(i)) for i in range(c.text_layers)
        )
        self.ln_final = LayerNorm(c.text_width, eps=1e-5)
        self.image_projection = nn.Parameter(torch.randn(c.vision_width, c.embed_dim) * c.vision_width**-0.5)
        self.text_projection = nn.Parameter(torch.randn(c.text_width, c.embed_dim) * c.text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.659260036932778))  # log(1 / 0.07)
        self.set_attn_backend(attn_backend)

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    def set_attn_backend(self, name: str | None) -> "DiffCLIP":
        """Switch every attention layer to backend `name` (see `diffclip.backends`); returns the model."""
        self._attn_backend = backends.check_name(name)
        for m in self.modules():
            if isinstance(m, DiffAttention):
                m.backend = self._attn_backend
        return self

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised pixels -> (B, embed_dim), unnormalised."""
        x = self.visual(image.to(self.image_projection.dtype))
        return x @ self.image_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, context_length) token ids, end token = the largest id of each row -> (B, embed_dim)."""
        if text.dim() != 2 or text.shape[1] > self.config.context_length:
            raise ValueError(f"text must be (B, L) token ids with L <= {self.config.context_length}, "
                             f"got shape {tuple(text.shape)}")
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return x @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_embed": self.encode_image(image),
            "text_embed": self.encode_text(text),
            "logit_scale": self.logit_scale.exp(),
        }
