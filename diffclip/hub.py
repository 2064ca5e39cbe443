"""Locating a checkpoint: a local file, or a Hugging Face hub id downloaded into (and then read from) the cache."""

from __future__ import annotations

import os

DEFAULT_CHECKPOINT = "hammh0a/DiffCLIP_ViTB16_CC12M"
DEFAULT_FILENAME = "checkpoint_best.pt"
KNOWN = ("hammh0a/DiffCLIP_ViTB16_CC3M", "hammh0a/DiffCLIP_ViTB16_CC12M")


def is_hub_id(source: str) -> bool:
    """`owner/name` (optionally `hf-hub:owner/name`) that is not an existing local path."""
    s = source[len("hf-hub:"):] if source.startswith("hf-hub:") else source
    if os.path.exists(source) or s.count("/") != 1 or s.startswith((".", "/")):
        return False
    return "." not in s.split("/")[0]


def resolve_source(source: str | os.PathLike, filename: str = DEFAULT_FILENAME) -> str:
    """A local path for `source`; hub ids are downloaded (and cached) with huggingface_hub."""
    source = os.fspath(source)
    if not is_hub_id(source):
        if not os.path.exists(source):
            raise FileNotFoundError(f"checkpoint not found: {source} (give a local .pt/.pth/.safetensors file or a "
                                    f"hub id such as {DEFAULT_CHECKPOINT})")
        return source
    repo_id = source[len("hf-hub:"):] if source.startswith("hf-hub:") else source
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as e:  # pragma: no cover - part of the [clip] extra
        raise RuntimeError("downloading from the hub needs huggingface_hub: pip install 'diffclip-triton[clip]'") \
            from e
    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as e:  # offline, unknown repo, network error: all end the same way for the user
        raise RuntimeError(
            f"could not get {filename} of {repo_id} from the Hugging Face hub and it is not in the cache "
            f"({constants.HF_HUB_CACHE}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            f"Download it where the hub is reachable, or pass a local file path "
            f"(e.g. diffclip.load('/path/to/{filename}'))"
        ) from None
