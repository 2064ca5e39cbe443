"""Tokenizer: open_clip's CLIP BPE tokenizer (it ships its vocabulary). No BPE is written here."""

from __future__ import annotations

import warnings

import torch

CLIP_VOCAB_SIZE = 49408


class Tokenizer:
    """Callable: a string or list of strings -> (n, context_length) int64 token ids, CLIP style (start 49406,
    words, end 49407, zero padding; truncated to fit with the end token kept).

    A model with a smaller vocabulary than CLIP's (toy or test models) cannot represent BPE ids; for those the
    ids are folded into its range (words modulo vocab−2, start/end to vocab−2/vocab−1) with a warning, so the
    end token stays the largest id. The released DiffCLIP models use CLIP's vocabulary and are unaffected.
    """

    def __init__(self, context_length: int = 77, vocab_size: int = CLIP_VOCAB_SIZE):
        try:
            import open_clip
        except ImportError as e:
            raise RuntimeError("the tokenizer needs open_clip: pip install 'diffclip-triton[clip]'") from e
        self._bpe = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)
        self.context_length = context_length
        self.vocab_size = vocab_size
        if vocab_size < CLIP_VOCAB_SIZE:
            warnings.warn(f"model vocabulary ({vocab_size}) is smaller than CLIP's ({CLIP_VOCAB_SIZE}): token ids "
                          "are folded into it; text embeddings of such a model are for testing only", stacklevel=2)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = self._bpe(texts)
        if self.vocab_size < CLIP_VOCAB_SIZE:
            v = self.vocab_size
            words = (ids > 0) & (ids < CLIP_VOCAB_SIZE - 2)
            folded = torch.where(words, 1 + (ids - 1) % (v - 3), ids)
            folded = torch.where(ids == CLIP_VOCAB_SIZE - 2, torch.full_like(ids, v - 2), folded)
            ids = torch.where(ids == CLIP_VOCAB_SIZE - 1, torch.full_like(ids, v - 1), folded)
        return ids


def get_tokenizer(context_length: int = 77, vocab_size: int = CLIP_VOCAB_SIZE) -> Tokenizer:
    return Tokenizer(context_length, vocab_size)
