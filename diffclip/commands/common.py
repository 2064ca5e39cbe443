"""What the subcommands share: the user-error type, the model options and loading, prompt templates, reading
images and text files."""

from __future__ import annotations

import argparse
import os
import string


class UsageError(Exception):
    """A mistake the user can fix (bad path, unreadable file, bad option): one line on stderr, exit status 2."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    from ..hub import DEFAULT_CHECKPOINT

    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"local .pt/.pth/.safetensors file or hub id (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--backend", default=None, choices=["eager", "sdpa", "triton", "auto"],
                   help="attention backend (default: $DIFFCLIP_ATTN_BACKEND, else auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="model dtype (default: bf16 on CUDA, so that auto picks the fused kernel; fp32 on CPU)")


def device_from(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"bad --device {name!r}: {e}") from None


def load_model(args):
    from ..loading import load

    device = device_from(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    return load(args.checkpoint, attn_backend=args.backend, device=device, dtype=dtype)


def check_template(template: str) -> str:
    """A prompt template must hold exactly one `{}` and no other replacement field (escape literal braces as
    `{{`/`}}`): checked before the model loads, so `"a {} photo {x}"` is a usage error, not a KeyError later."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as e:
        raise UsageError(f"bad template {template!r}: {e} (escape literal braces as {{{{ and }}}})") from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise UsageError(f"template {template!r} must contain exactly one {{}} and no other {{...}} field "
                         "(escape literal braces as {{ and }})")
    return template


def open_images(paths, preprocess):
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        if not os.path.isfile(p):
            raise UsageError(f"image not found: {p}")
        try:
            with Image.open(p) as img:
                # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse the whole range up front, before
                # the pixels are decoded (a small PNG can claim 20000 x 20000).
                if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                    raise UsageError(f"image {p} claims {img.width} x {img.height} pixels, over the limit of "
                                     f"{Image.MAX_IMAGE_PIXELS} (PIL.Image.MAX_IMAGE_PIXELS; a decompression bomb?)")
                out.append(preprocess(img))
        except Image.DecompressionBombError as e:
            raise UsageError(f"image {p} refused: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # PIL raises all of these
            raise UsageError(f"cannot read image {p}: {e}") from None
    return out


def read_lines(path, what):
    if not os.path.exists(path) or os.path.isdir(path):  # exists, not isfile: `--templates <(...)` is a pipe
        raise UsageError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise UsageError(f"{what} file is empty: {path}")
    return lines


def default_workers() -> int:
    """Image-loading worker processes per rank: CLIP Benchmark's 4 where the cores allow (the cores this process
    may use, shared by the ranks of this machine), 0 (load in the main process) on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    per_rank = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(4, per_rank) if per_rank > 1 else 0
