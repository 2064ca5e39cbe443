"""DiffCLIP: a CLIP ViT-B/16 whose attention layers, in both encoders, are differential attention.

Parameter names match the official checkpoints key for key (`visual.*`, `transformer.resblocks.*`, ...).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import backends
from .config import DiffCLIPConfig
from .layers import DiffAttention, LayerNorm, TextMlp, VisionMlp, tower_lambdas


class VisionBlock(nn.Module):
    def __init__(self, width, heads, lambda_init):
        super().__init__()
        self.norm1 = LayerNorm(width, eps=1e-5)
        self.attn = DiffAttention(width, heads, lambda_init, causal=False)
        self.norm2 = LayerNorm(width, eps=1e-5)
        self.mlp = VisionMlp(width, 4 * width)

    def forward(self, x, lam=None):
        x = x + self.attn(self.norm1(x), lam)
        return x + self.mlp(self.norm2(x))


class TextBlock(nn.Module):
    def __init__(self, width, heads, lambda_init):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=1e-5)
        self.attn = DiffAttention(width, heads, lambda_init, causal=True)
        self.ln_2 = LayerNorm(width, eps=1e-5)
        self.mlp = TextMlp(width, 4 * width)

    def forward(self, x, lam=None):
        x = x + self.attn(self.ln_1(x), lam)
        return x + self.mlp(self.ln_2(x))


def layer_lambdas(blocks) -> tuple:
    """Every block's λ, computed for the whole encoder at once (`tower_lambdas`); None for a block whose attention
    is not differential (the benchmarks' plain-CLIP model swaps the attention modules)."""
    attns = [block.attn for block in blocks]
    if attns and all(isinstance(a, DiffAttention) for a in attns):
        return tower_lambdas(attns)
    return (None,) * len(attns)


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
        for block, lam in zip(self.blocks, layer_lambdas(self.blocks)):
            x = block(x, lam)
        return self.norm(x)[:, 0]


def check_image(image, size: int) -> None:
    """Images must be a (B, 3, size, size) float batch: another size would be cropped or padded silently by the
    patch grid, and uint8 pixels would skip the normalisation the model expects."""
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() == 3 and image.shape[0] == 3:
        raise ValueError(f"image must be batched (B, 3, {size}, {size}); got one image of shape "
                         f"{tuple(image.shape)}: pass image[None]")
    if image.dim() != 4 or image.shape[1] != 3 or image.shape[2] != size or image.shape[3] != size:
        raise ValueError(f"image must have shape (B, 3, {size}, {size}) (the model's image size), got "
                         f"{tuple(image.shape)}; use the preprocess transform returned by diffclip.load")
    if not image.is_floating_point():
        raise TypeError(f"image must be float (normalised pixels), got {image.dtype}; use the preprocess "
                        "transform returned by diffclip.load")


def check_text(text, context_length: int, vocab_size: int) -> None:
    """Token ids: an integer (B, L) tensor with 1 <= L <= context_length and ids in [0, vocab_size). The range is
    checked exactly on CPU; on an accelerator asynchronously (no host sync: a bad id fails the next
    synchronisation with this message instead of an anonymous device-side assert); not while compiling."""
    if not isinstance(text, torch.Tensor):
        raise TypeError(f"text must be a torch.Tensor of token ids, got {type(text).__name__}")
    if text.is_floating_point() or text.is_complex() or text.dtype == torch.bool:
        raise TypeError(f"text must hold integer token ids (use the tokenizer), got {text.dtype}")
    if text.dim() != 2 or not 1 <= text.shape[1] <= context_length:
        raise ValueError(f"text must be (B, L) token ids with 1 <= L <= {context_length}, got shape "
                         f"{tuple(text.shape)}")
    if text.numel() == 0 or torch.compiler.is_compiling():
        return
    in_range = (text.min() >= 0) & (text.max() < vocab_size)
    msg = f"text token ids must lie in [0, {vocab_size}) (the model's vocabulary)"
    if text.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(f"{msg}, got ids in [{int(text.min())}, {int(text.max())}]")
    else:
        torch._assert_async(in_range, msg)


def _last_needed_position(eot: torch.Tensor, length: int) -> int:
    """Tokens after the batch's last end-of-text token cannot change any output (the text encoder is causal and
    everything else acts per token), so the encoder runs on the first max(eot) + 1 positions only: exact, and most
    prompts are far shorter than the 77-token context. Reading max(eot) costs one host sync, so the full length is
    kept while compiling (a data-dependent size) or capturing a CUDA graph."""
    if eot.numel() == 0 or torch.compiler.is_compiling():
        return length
    if eot.is_cuda and torch.cuda.is_current_stream_capturing():
        return length
    return int(eot.max()) + 1


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
        """(B, 3, S, S) normalised float pixels, S = config.vision_img_size -> (B, embed_dim), unnormalised."""
        check_image(image, self.config.vision_img_size)
        x = self.visual(image.to(self.image_projection.dtype))
        return x @ self.image_projection

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) integer token ids, 1 <= L <= context_length, end token = the largest id of each row ->
        (B, embed_dim)."""
        check_text(text, self.config.context_length, self.config.vocab_size)
        eot = text.argmax(dim=-1)
        text = text[:, : _last_needed_position(eot, text.shape[1])]
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        for block, lam in zip(self.transformer.resblocks, layer_lambdas(self.transformer.resblocks)):
            x = block(x, lam)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        return x @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_embed": self.encode_image(image),
            "text_embed": self.encode_text(text),
            "logit_scale": self.logit_scale.exp(),
        }
