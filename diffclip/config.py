"""DiffCLIP model configuration, and its inference from a checkpoint's tensor shapes."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch


@dataclass
class DiffCLIPConfig:
    """Sizes of a DiffCLIP model. Heads count query/key heads; differential attention pairs them (heads/2 diff-heads).

    `lambda_init` is not stored in checkpoints (it is a constant of the architecture): 0.8 for the released
    models. `lambda_depth_schedule=True` uses λ_init(l) = 0.8 − 0.6·exp(−0.3·l) for layer l (0-based), the
    paper's DiffCLIP* variant, instead of the constant.
    """

    embed_dim: int = 512
    vision_width: int = 768
    vision_img_size: int = 224
    vision_patch_size: int = 16
    vision_depth: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: int = 8
    text_layers: int = 12
    lambda_init: float = 0.8
    lambda_depth_schedule: bool = False

    @classmethod
    def vit_b16(cls, **overrides) -> "DiffCLIPConfig":
        """DiffCLIP ViT-B/16, the released CC3M / CC12M models."""
        return cls(**overrides)

    def __post_init__(self):
        for name, width, heads in (("vision", self.vision_width, self.vision_heads),
                                   ("text", self.text_width, self.text_heads)):
            if heads <= 0 or heads % 2 or width % heads:
                raise ValueError(f"{name}_heads must be even and divide {name}_width={width}, got {heads}")
        if self.vision_img_size % self.vision_patch_size:
            raise ValueError(f"vision_img_size={self.vision_img_size} is not a multiple of "
                             f"vision_patch_size={self.vision_patch_size}")

    def lambda_init_for(self, layer: int) -> float:
        if self.lambda_depth_schedule:
            return 0.8 - 0.6 * math.exp(-0.3 * layer)
        return self.lambda_init

    def to_dict(self) -> dict:
        return asdict(self)


def _count(prefix: str, keys) -> int:
    """Number of blocks `prefix<i>.` in the keys. Indices must run 0..n-1: the depth is then bounded by what the file
    stores (one stray `visual.blocks.3000.x` must not build a 3001-layer model)."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if found != set(range(len(found))):
        gaps = sorted(set(range(max(found) + 1)) - found)[:5] if found else []
        raise ValueError(f"block indices under {prefix!r} are not 0..n-1 (missing e.g. {gaps}; highest "
                         f"{max(found)}): not a DiffCLIP state dict")
    return len(found)


# Tensor rank each shape-defining entry must have (a 0-d cls_token must not pass as a width).
_RANKS = {"visual.cls_token": 3, "visual.pos_embed": 3, "visual.patch_embed.proj.weight": 4, "image_projection": 2,
          "token_embedding.weight": 2, "positional_embedding": 2, "visual.blocks.0.attn.lambda_q1": 1,
          "transformer.resblocks.0.attn.lambda_q1": 1}


def infer_config(state_dict: dict[str, torch.Tensor], *, lambda_init: float = 0.8) -> DiffCLIPConfig:
    """Read every size from the tensor shapes of a (prefix-free) DiffCLIP state dict.

    Heads come from the λ vectors, whose length is the head dim: heads = width / len(lambda_q1). Raises ValueError
    (naming the entry) for anything that is not a consistent DiffCLIP state dict.
    """
    missing = [k for k in _RANKS if k not in state_dict]
    if missing:
        raise ValueError(f"not a DiffCLIP state dict: missing {', '.join(missing)}")
    sd = state_dict
    for k, rank in _RANKS.items():
        if sd[k].dim() != rank or sd[k].numel() == 0:
            raise ValueError(f"{k} must be a non-empty {rank}-d tensor, got shape {tuple(sd[k].shape)}")
    v_width = sd["visual.cls_token"].shape[-1]
    patch = sd["visual.patch_embed.proj.weight"].shape[-1]
    n_pos = sd["visual.pos_embed"].shape[1] - 1
    grid = math.isqrt(max(n_pos, 0))
    if n_pos < 1 or grid * grid != n_pos:
        raise ValueError(f"visual.pos_embed holds {n_pos} patch positions, not a square grid")
    t_width = sd["token_embedding.weight"].shape[1]
    v_head = sd["visual.blocks.0.attn.lambda_q1"].shape[0]
    t_head = sd["transformer.resblocks.0.attn.lambda_q1"].shape[0]
    for name, width, head in (("vision", v_width, v_head), ("text", t_width, t_head)):
        if width % head:
            raise ValueError(f"{name} width {width} is not a multiple of its λ vectors' length (head dim) {head}")
    return DiffCLIPConfig(
        embed_dim=sd["image_projection"].shape[1],
        vision_width=v_width,
        vision_img_size=grid * patch,
        vision_patch_size=patch,
        vision_depth=_count("visual.blocks.", sd),
        vision_heads=v_width // v_head,
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=t_width,
        text_heads=t_width // t_head,
        text_layers=_count("transformer.resblocks.", sd),
        lambda_init=lambda_init,
    )
