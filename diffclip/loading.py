"""`diffclip.load`: checkpoint -> (model, preprocess, tokenizer), open_clip style."""

from __future__ import annotations

import os

import torch

from .checkpoint import CheckpointError, check_keys, read_state_dict
from .config import infer_config
from .hub import DEFAULT_FILENAME, resolve_source
from .image import image_transform
from .model import DiffCLIP
from .text import get_tokenizer

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise TypeError(f"dtype must be a torch dtype or one of {', '.join(_DTYPES)}, got {dtype!r}")


def load(source: str | os.PathLike, *, attn_backend: str | None = None, device=None, dtype=None,
         lambda_init: float = 0.8, filename: str = DEFAULT_FILENAME):
    """Load a DiffCLIP checkpoint; returns ``(model, preprocess, tokenizer)``.

    Args:
        source: a local .pt/.pth (official training checkpoint) or .safetensors file, or a hub id such as
            "hammh0a/DiffCLIP_ViTB16_CC12M" (file `filename`, downloaded and cached by huggingface_hub).
        attn_backend: "eager", "sdpa", "triton" or "auto"; None reads $DIFFCLIP_ATTN_BACKEND, else "auto".
        device: where to put the model (default CPU).
        dtype: float32 (default), float16 or bfloat16 (also "fp16", "bf16", ...).
        lambda_init: λ_init of the architecture (not stored in checkpoints); 0.8 for the released models.

    The model is in eval mode. Sizes are inferred from the tensor shapes; keys are checked strictly.
    """
    dtype = parse_dtype(dtype)
    path = resolve_source(source, filename)
    model, config, state_dict = read_checked(path, lambda_init=lambda_init, attn_backend=attn_backend)
    target = dtype or torch.float32
    model.load_state_dict({k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()},
                          assign=True)
    model = model.to(device=device).eval()
    return model, image_transform(config.vision_img_size), get_tokenizer(config.context_length, config.vocab_size)


def read_checked(path: str, *, lambda_init: float = 0.8, attn_backend: str | None = None):
    """(meta-device model, config, state dict) of a local checkpoint whose keys and shapes match the model that
    its sizes describe. Nothing is allocated for those sizes before the check: the model is built on the meta
    device (load its weights with ``load_state_dict(state_dict, assign=True)``). Raises CheckpointError."""
    state_dict = read_state_dict(path)
    try:
        config = infer_config(state_dict, lambda_init=lambda_init)
    except ValueError as e:  # inconsistent sizes: not a DiffCLIP checkpoint
        raise CheckpointError(f"{path}: {e}") from None
    with torch.device("meta"):
        model = DiffCLIP(config, attn_backend=attn_backend)
    try:
        check_keys(model, state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model, config, state_dict
