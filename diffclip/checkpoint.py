"""Reading DiffCLIP checkpoints safely: official training checkpoints (.pt/.pth) and weights-only .safetensors.

Checkpoints are untrusted input. Pickled files are read with `torch.load(weights_only=True)` plus an explicit
allow-list of the few harmless globals the official training checkpoints contain; a file that needs any other
global is refused, naming it, before anything in it runs. `weights_only=False` is never used.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import torch

from .config import DiffCLIPConfig, infer_config

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unsafe, not DiffCLIP, or with missing/unexpected keys."""


def _numpy_scalar(np):
    try:
        return np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        return np.core.multiarray.scalar


def _allowed_globals():
    """(object, pickle name) pairs: what an official DiffCLIP training checkpoint references besides tensors.

    numpy scalars (`best_acc1`) and dtypes, the argparse.Namespace of training arguments, and the paths in it.
    Files written under numpy 1.x name the scalar `numpy.core.multiarray.scalar`; both spellings are allowed.
    """
    pairs = [
        (argparse.Namespace, "argparse.Namespace"),
        (pathlib.PosixPath, "pathlib.PosixPath"),
        (pathlib.PurePosixPath, "pathlib.PurePosixPath"),
    ]
    try:
        import numpy as np
    except ImportError:  # without numpy no numpy global can be unpickled anyway
        return pairs
    scalar = _numpy_scalar(np)
    pairs += [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
    ]
    # numpy >= 1.25 pickles dtypes through their classes (numpy.dtypes.Float64DType, ...).
    for name in (n.rsplit(".", 1)[1] for n in ALLOWED_GLOBAL_NAMES if n.startswith("numpy.dtypes.")):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            pairs.append((cls, f"numpy.dtypes.{name}"))
    return pairs


# Names, fixed whether or not numpy is installed: the check below refuses by name, before anything is imported.
ALLOWED_GLOBAL_NAMES = frozenset({
    "argparse.Namespace", "pathlib.PosixPath", "pathlib.PurePosixPath", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar", "numpy.dtype",
    *(f"numpy.dtypes.{n}" for n in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType",
                                    "BoolDType")),
})


def load_pickled(path: str) -> dict:
    """torch.load with weights_only=True and the allow-list; anything else is refused by name, unread."""
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - ALLOWED_GLOBAL_NAMES
    if unsafe:
        raise CheckpointError(
            f"refusing to load {path}: it needs globals outside the allow-list: {', '.join(sorted(unsafe))} "
            "(only tensors, numpy scalars/dtypes, argparse.Namespace and paths are accepted)"
        )
    with torch.serialization.safe_globals(_allowed_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model weights from a training checkpoint ({"state_dict": ...}) or a bare state dict, `module.` stripped."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights of a local checkpoint file, by suffix: .safetensors, or a pickled .pt/.pth/.bin/.ckpt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return extract_state_dict(load_file(path, device="cpu"))
    if not path.endswith(PICKLE_SUFFIXES):
        raise CheckpointError(f"unknown checkpoint type {path!r}: expected .safetensors or one of {PICKLE_SUFFIXES}")
    return extract_state_dict(load_pickled(path))


def check_keys(model: torch.nn.Module, state_dict: dict) -> None:
    """Strict key and shape check, naming every missing, unexpected and mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise CheckpointError("checkpoint does not match the DiffCLIP model: " + " | ".join(problems))


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str, config: DiffCLIPConfig | None = None,
                     dtype: torch.dtype | None = None) -> None:
    """Weights only (no optimizer, no pickled arguments), optionally cast to `dtype` (floating tensors only)."""
    import json

    from safetensors.torch import save_file

    out = {}
    for k, v in state_dict.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    meta = {"format": "pt"}
    if config is not None:
        meta["diffclip_config"] = json.dumps(config.to_dict())
    save_file(out, path, metadata=meta)


__all__ = ["CheckpointError", "load_pickled", "extract_state_dict", "read_state_dict", "check_keys",
           "save_safetensors", "infer_config", "ALLOWED_GLOBAL_NAMES"]
