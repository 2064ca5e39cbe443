"""Where does DiffCLIP look for a text? Text-conditioned relevance maps from the differential attention maps.

The method is Chefer et al. 2021 ("Generic Attention-model Explainability for Interpreting Bi-Modal and
Encoder-Decoder Transformers"), with the rule of their CLIP demo (Transformer-MM-Explainability), which the DiffCLIP
authors used for the paper's Figure 2. DiffCLIP's differential map takes the place of softmax attention:

- score: the image-text logit of each pair, logit_scale · cos(image_embed, text_embed); pair i is image i with
  text i.
- A: a block's differential attention map, per diff-head, ``A = P1 − λ·P2`` (B, H, N, N) with
  ``P = softmax(s·QKᵀ)``: exactly the map that multiplies V in `kernels.diff_attn_reference` (recorded through its
  `attn_hook`, no second copy of the attention math), so before DiffCLIP's per-head RMS norm and the
  (1 − λ_init) output scale, which act on A·V. A has negative entries; the clamp below keeps the positive part of
  ∂score/∂A ⊙ A only.
- for the blocks from `start_layer` on: ``cam = mean_heads(clamp(∂score/∂A ⊙ A, min=0))`` and ``R ← R + cam·R``,
  from R = I.
- image: R[:, 0, 1:], the class token's row over the patches, on the G x G patch grid, min-max scaled to [0, 1] per
  image. Text (`text_relevance`): R[b, eot, :], the end token's row (the text embedding) over the tokens.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .layers import DiffAttention
from .model import DiffCLIP, check_image, check_text


def relevance(model: DiffCLIP, images: torch.Tensor, tokens: torch.Tensor, *, start_layer: int = -1) -> torch.Tensor:
    """Relevance of each image patch for its pair's text: (B, G, G), each map min-max scaled to [0, 1].

    Args:
        model: a DiffCLIP (any attention backend: this runs on the eager one, which materialises the maps, and
            restores the model's backend, train/eval mode and requires_grad flags afterwards, also on error).
        images: (B, 3, S, S) preprocessed images.
        tokens: (B, L) token ids; image i is scored with text i.
        start_layer: first vision block used, a Python index: −1 the last block only (Chefer et al.'s CLIP
            default), 0 all blocks.

    No parameter gradient is accumulated (gradients are taken with respect to the maps only). A map whose values
    are all equal (e.g. all zero: no positive contribution) is returned as zeros.
    """
    maps, _ = explain(model, images, tokens, image_start=start_layer)
    return maps


def text_relevance(model: DiffCLIP, images: torch.Tensor, tokens: torch.Tensor, *,
                   start_layer: int = -1) -> torch.Tensor:
    """Relevance of each text token for its pair's image-text score: (B, L), the end token's row of R over the
    tokens, zero after the end token; each row divided by its largest value over the words (the tokens strictly
    between the start and end tokens), so the most relevant word is 1. Same rule and guarantees as `relevance`,
    over the text blocks (`start_layer` indexes them)."""
    _, text = explain(model, images, tokens, text_start=start_layer)
    eot = tokens.argmax(dim=-1)
    pos = torch.arange(text.shape[1], device=text.device)
    words = (pos[None] > 0) & (pos[None] < eot[:, None].to(text.device))
    peak = torch.where(words, text, torch.zeros_like(text)).amax(dim=1, keepdim=True)
    text = torch.where(pos[None] <= eot[:, None].to(text.device), text, torch.zeros_like(text))
    return text / torch.where(peak > 0, peak, torch.ones_like(peak))


def explain(model: DiffCLIP, images: torch.Tensor, tokens: torch.Tensor, *, image_start: int | None = -1,
            text_start: int | None = None):
    """Both towers from one forward and one gradient pass: (image maps (B, G, G) min-max scaled, or None; text
    rows (B, L), the end token's row of R unscaled, or None). Each tower's rollout starts at its `*_start` block;
    None skips that tower."""
    _check_inputs(model, images, tokens)
    vis = _blocks(model.visual.blocks, image_start, "vision")
    txt = _blocks(model.transformer.resblocks, text_start, "text")
    if not vis and not txt:
        raise ValueError("nothing to explain: image_start and text_start are both None")
    vis_maps, txt_maps = [], []
    with torch.inference_mode(False), torch.enable_grad(), _explain_mode(model):
        for blocks, maps in ((vis, vis_maps), (txt, txt_maps)):
            for block in blocks:
                block.attn.attn_hook = maps.append
        score = scores(model, images.detach().clone(), tokens)
        # Each pair's score depends on its own batch row only (no op mixes rows in eval mode), so the gradient of
        # the sum gives every row the gradient of its own score.
        grads = torch.autograd.grad(score.sum(), vis_maps + txt_maps)
    image_maps = text_rows = None
    if vis:
        r = _rollout(vis_maps, grads[:len(vis_maps)])[:, 0, 1:]
        g = model.config.vision_img_size // model.config.vision_patch_size
        image_maps = _min_max(r.reshape(r.shape[0], g, g))
    if txt:
        r = _rollout(txt_maps, grads[len(vis_maps):])
        eot = tokens.argmax(dim=-1).to(r.device)
        row = r[torch.arange(r.shape[0], device=r.device), eot]  # (B, L'): the encoder stops at the last end token
        text_rows = F.pad(row, (0, tokens.shape[1] - row.shape[1]))
    return image_maps, text_rows


def scores(model: DiffCLIP, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B,) image-text logits of the pairs: logit_scale · cos(image_embed[i], text_embed[i]), in fp32."""
    img = F.normalize(model.encode_image(images).float(), dim=-1)
    txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return model.logit_scale.exp().float() * (img * txt).sum(dim=-1)


def _rollout(maps, grads) -> torch.Tensor:
    """R = I, then R ← R + mean_heads(clamp(∂score/∂A ⊙ A, min=0)) · R per block, in order: (B, N, N)."""
    with torch.no_grad():
        a = maps[0]
        r = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand(a.shape[0], -1, -1)
        for a, g in zip(maps, grads):
            cam = (g * a).clamp(min=0).mean(dim=1)
            r = r + torch.bmm(cam, r)
    return r


def _min_max(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(flat))
    return out.view_as(x)


def _blocks(blocks, start, tower: str) -> list:
    """The blocks from `start` on (a Python index: −1 the last one, 0 all); none for start=None."""
    if start is None:
        return []
    n = len(blocks)
    if isinstance(start, bool) or not isinstance(start, int):
        raise TypeError(f"start_layer must be an int, got {type(start).__name__}")
    if not -n <= start < n:
        raise ValueError(f"start_layer must lie in [{-n}, {n - 1}] for the model's {n} {tower} blocks "
                         f"(-1: the last block only, 0: all blocks), got {start}")
    return list(blocks)[start % n:]


def _check_inputs(model, images, tokens) -> None:
    if not isinstance(model, DiffCLIP):
        raise TypeError(f"model must be a diffclip.DiffCLIP, got {type(model).__name__}")
    check_image(images, model.config.vision_img_size)
    check_text(tokens, model.config.context_length, model.config.vocab_size)
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(f"images and tokens must pair up one to one (image i is scored with text i): got "
                         f"{images.shape[0]} images and {tokens.shape[0]} texts")
    if images.shape[0] == 0:
        raise ValueError("images and tokens are empty (batch size 0)")


@contextlib.contextmanager
def _explain_mode(model: DiffCLIP):
    """Eager backend (the maps must exist), eval mode, every parameter requiring grad (so the maps are in the
    autograd graph whatever the caller froze); the backends, modes, flags and attention hooks are restored on
    exit, also when an exception is raised."""
    backend = model.attn_backend
    attn = [(m, m.backend, m.attn_hook) for m in model.modules() if isinstance(m, DiffAttention)]
    training = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.set_attn_backend("eager")
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in training:
            m.training = mode
        model.set_attn_backend(backend)
        for m, name, hook in attn:
            m.backend, m.attn_hook = name, hook
