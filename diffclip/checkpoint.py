"""Reading DiffCLIP checkpoints safely: official training checkpoints (.pt/.pth) and weights-only .safetensors.

Checkpoints are untrusted input. Before anything is unpickled, a pickled file's zip archive is checked (entries
stored uncompressed, sizes within the file) and its pickle's globals are scanned here against a closed allow-list
(torch's tensor-rebuild globals plus the few harmless ones the official training checkpoints contain), whatever
other libraries registered with `torch.serialization.add_safe_globals`. Only then is it read with
`torch.load(weights_only=True)`. `weights_only=False` is never used. Loaded tensors must be backed by as much
storage as their shape needs (no stride-0 tricks). Every failure is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import pickle
import zipfile

import torch

from .config import DiffCLIPConfig, infer_config

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unsafe, corrupt, not DiffCLIP, or with missing/unexpected keys."""


MAX_LISTED = 12  # names listed in one error message; a hostile file can hold millions of keys


def listing(names) -> str:
    """Sorted names, at most MAX_LISTED of them, then how many more."""
    names = sorted(names)
    head = ", ".join(names[:MAX_LISTED])
    return head + (f", ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")


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


# torch's own globals for rebuilding tensors, parameters and state dicts (what torch.save writes), plus
# _codecs.encode, which numpy scalars use for their bytes. Closed: not widened by anything registered at runtime.
TORCH_REBUILD_GLOBALS = frozenset({
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "_codecs.encode",
    *(f"torch.{t}Storage" for t in ("Float", "Half", "BFloat16", "Double", "Long", "Int", "Short", "Char", "Byte",
                                    "Bool")),
})
CLOSED_ALLOW_LIST = ALLOWED_GLOBAL_NAMES | TORCH_REBUILD_GLOBALS


def _open_archive(path: str) -> tuple[zipfile.ZipFile, str]:
    """The checkpoint's zip archive and its pickle's entry name, after checking that nothing in it can expand past
    the file: torch.save stores entries uncompressed, so a compressed entry (a zip bomb) is refused."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a zip-format torch checkpoint (the legacy torch.save format of torch < 1.6, or not a "
            "checkpoint at all); only zip-format .pt/.pth files and .safetensors are read")
    try:
        archive = zipfile.ZipFile(path)
        entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt zip archive ({e})") from None
    size = os.path.getsize(path)
    for info in entries:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: archive entry {info.filename!r} is compressed; torch.save never "
                                  "compresses, and a compressed entry can expand far beyond the file (refused)")
        if info.file_size > size:
            raise CheckpointError(f"{path}: archive entry {info.filename!r} claims {info.file_size} bytes, more than "
                                  f"the file's {size} (corrupt or hostile)")
    if sum(info.file_size for info in entries) > size:
        raise CheckpointError(f"{path}: archive entries add up to more bytes than the file holds (corrupt or "
                              "hostile)")
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)} (not a torch "
                              "checkpoint)")
    return archive, pickles[0]


def pickle_globals(path: str) -> set[str]:
    """The globals ("module.name") a checkpoint's pickle references, read without unpickling anything."""
    from torch._weights_only_unpickler import get_globals_in_pkl

    archive, name = _open_archive(path)
    with archive:
        try:
            data = archive.read(name)  # bounded: stored uncompressed, within the file's size
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt archive entry {name!r} ({e})") from None
    try:
        return set(get_globals_in_pkl(io.BytesIO(data)))
    except Exception as e:  # noqa: BLE001 - any failure to parse the pickle means the file is refused
        raise CheckpointError(f"{path}: unreadable pickle in {name!r} ({type(e).__name__}: {e})") from None


def load_pickled(path: str) -> dict:
    """torch.load with weights_only=True, after the archive checks and the closed allow-list scan."""
    unsafe = pickle_globals(path) - CLOSED_ALLOW_LIST
    if unsafe:
        raise CheckpointError(
            f"refusing to load {path}: it needs globals outside the allow-list: {listing(unsafe)} "
            "(only tensors, numpy scalars/dtypes, argparse.Namespace and paths are accepted)"
        )
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused by the weights-only unpickler ({first}); re-save it with "
                              "torch.save's default pickle protocol (2), or as .safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {first})") from None


def check_tensor_storage(name: str, t: torch.Tensor) -> None:
    """A tensor must be backed by as many bytes as its shape needs: a stride-0 view of one element must not pass
    for a (1, 1, 2^20) weight (it would fake the model's width)."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride())):
        raise CheckpointError(f"tensor {name!r} of shape {tuple(t.shape)} has a zero stride (a broadcast view, not "
                              "stored data)")
    needed = t.numel() * t.element_size()
    held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if needed > held:
        raise CheckpointError(f"tensor {name!r} of shape {tuple(t.shape)} needs {needed} bytes but its storage holds "
                              f"{held}")


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model weights from a training checkpoint ({"state_dict": ...}) or a bare state dict, `module.` stripped."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError("checkpoint holds no state dict of tensors")
    for k, v in obj.items():
        check_tensor_storage(k, v)
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated .safetensors file ({e})") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights of a local checkpoint file, by suffix: .safetensors, or a pickled .pt/.pth/.bin/.ckpt."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        raw = _read_safetensors(path)
    elif path.endswith(PICKLE_SUFFIXES):
        raw = load_pickled(path)
    else:
        raise CheckpointError(f"unknown checkpoint type {path!r}: expected .safetensors or one of {PICKLE_SUFFIXES}")
    try:
        return extract_state_dict(raw)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_keys(model: torch.nn.Module, state_dict: dict) -> None:
    """Strict key and shape check, naming every missing, unexpected and mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    problems = []
    if missing:
        problems.append("missing keys: " + listing(missing))
    if unexpected:
        problems.append("unexpected keys: " + listing(unexpected))
    if shapes:
        more = f"; ... and {len(shapes) - MAX_LISTED} more" if len(shapes) > MAX_LISTED else ""
        problems.append("shape mismatches: " + "; ".join(shapes[:MAX_LISTED]) + more)
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
