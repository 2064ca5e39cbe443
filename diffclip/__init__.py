"""DiffCLIP (arXiv 2503.06626) with a swappable differential-attention backend.

    import diffclip
    model, preprocess, tokenizer = diffclip.load("hammh0a/DiffCLIP_ViTB16_CC12M", attn_backend="auto")
"""

from .backends import NAMES as ATTN_BACKENDS
from .backends import sdpa_diff_attn
from .checkpoint import CheckpointError
from .config import DiffCLIPConfig, infer_config
from .image import image_transform
from .loading import load
from .model import DiffCLIP
from .text import get_tokenizer

__all__ = ["ATTN_BACKENDS", "CheckpointError", "DiffCLIP", "DiffCLIPConfig", "get_tokenizer", "image_transform",
           "infer_config", "load", "sdpa_diff_attn"]
