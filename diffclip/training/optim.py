"""AdamW with CLIP's weight-decay convention, cosine schedule with linear warm-up, loss scaling for fp16."""

from __future__ import annotations

import math

import torch

# 2-d and 3-d parameters that are embeddings, not projections: decaying them towards zero only shrinks the
# representation of tokens / positions (CLIP and SLIP keep them out of weight decay; open_clip decays the 2-d ones).
EMBEDDINGS = ("token_embedding.weight", "positional_embedding", "visual.pos_embed", "visual.cls_token")


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Parameters trained without weight decay: every bias, every norm gain (LayerNorm weights and the per-head
    RMS norm's `diff_norm.weight`), the λ vectors (`lambda_q1/k1/q2/k2`), the logit scale (all of these have
    fewer than 2 dimensions) and the embeddings (EMBEDDINGS)."""
    return p.ndim < 2 or name in EMBEDDINGS


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-8):
    """AdamW over the two groups. `foreach` is pinned so that a resumed run uses the same kernels (and rounding) as
    the run it continues, whatever torch would pick by default."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=False)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear from base_lr/warmup up to base_lr over `warmup`
    steps, then half a cosine down to 0 at `total` (open_clip's cosine_lr shape)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span)) * base_lr


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_state(base_lr: float, warmup: int, total: int) -> dict:
    """The schedule is a pure function of the step; the checkpoint keeps its parameters (plain numbers)."""
    return {"kind": "cosine", "base_lr": float(base_lr), "warmup": int(warmup), "total": int(total)}


def build_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16 (its gradients underflow without one); bf16 and fp32 need none (disabled scaler: its
    calls are no-ops, so the loop has one code path)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def clamp_logit_scale(model) -> None:
    """CLIP clamps the learned temperature so that exp(logit_scale) <= 100 (and >= 1)."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
