"""Training checkpoints: written atomically, read back through the project's hardened loader.

A checkpoint is one torch.save'd dict that `diffclip.load` reads as is: the model under "state_dict" in the
official layout (keys prefixed `module.`, as the official DDP training code saves them), and the training state
beside it under keys the loader ignores — "optimizer" and "scaler" (torch's own state dicts: tensors and plain
numbers), "schedule", "step", "data" (stream position: integers, or an integer tensor for webdataset workers),
"rng" (generator states as uint8 tensors), "args" (the command line as plain values). Nothing else is pickled, so
the file passes the loader's closed allow-list, and --resume reads it with the same scan + weights_only load.

Saving writes a temporary file in the run folder, fsyncs it and renames it over the target: a crash at any
point leaves the previous checkpoint complete and loadable (the stray `.part` file is removed at the next start).
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import tempfile

import torch

from ..checkpoint import CheckpointError, check_keys, extract_state_dict, load_pickled
from ..config import infer_config

LAST = "checkpoint_last.pt"
FORMAT = "diffclip-train/1"


def step_name(step: int) -> str:
    return f"checkpoint_step{step}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build(model, optimizer, scaler, *, step, samples_seen, data, schedule, args, config) -> dict:
    return {
        "format": FORMAT,
        "step": int(step),
        "state_dict": {"module." + k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "schedule": schedule,
        "data": {"samples_seen": int(samples_seen), **data},
        "rng": rng_state(),
        "diffclip_config": config.to_dict(),
        "args": {k: v for k, v in args.items() if v is None or isinstance(v, (bool, int, float, str))},
    }


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(folder: str, name: str, write) -> str:
    """write(tmp_path) fills a temporary file in `folder`; then it is fsynced and renamed to `name`. On any
    failure the temporary file is removed and the existing `name` is untouched."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)
    return os.path.join(folder, name)


def save(run_dir: str, state: dict, keep_step: bool) -> str:
    """checkpoint_last.pt, and with keep_step a copy as checkpoint_step<N>.pt (a hard link when the file system
    has them: the same bytes without a second write of a multi-GB file)."""
    path = atomic_write(run_dir, LAST, lambda tmp: torch.save(state, tmp))
    if keep_step:
        def link_or_copy(tmp):
            os.remove(tmp)
            try:
                os.link(path, tmp)
            except OSError:  # no hard links here (some network file systems): copy the bytes
                shutil.copyfile(path, tmp)
        atomic_write(run_dir, step_name(state["step"]), link_or_copy)
    return path


def remove_stale_parts(run_dir: str) -> list[str]:
    """Temporary files of a save that was killed (a crash cannot clean up after itself)."""
    stale = glob.glob(os.path.join(run_dir, ".checkpoint_*.pt.*.part"))
    for p in stale:
        os.remove(p)
    return stale


def resolve_resume(resume: str, run_dir: str) -> str | None:
    """`latest` -> RUN_DIR/checkpoint_last.pt if it exists, else None (a fresh start, so that the same command
    can be rerun after a preemption); a folder -> its checkpoint_last.pt; a file -> itself. Missing: error."""
    if resume == "latest":
        path = os.path.join(run_dir, LAST)
        return path if os.path.isfile(path) else None
    path = os.path.join(resume, LAST) if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {resume}: no checkpoint at {path}")
    return path


def _need(obj, key, types, path):
    if key not in obj or not isinstance(obj[key], types):
        raise CheckpointError(f"{path}: not a `diffclip train` checkpoint (no valid {key!r}); to start from a "
                              "model checkpoint use --init")
    return obj[key]


def read(path: str) -> dict:
    """A training checkpoint, read like any untrusted checkpoint (allow-list scan, weights_only), its model
    weights key-checked against the model their shapes describe, and its training state checked for shape."""
    obj = load_pickled(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a `diffclip train` checkpoint")
    try:
        sd = extract_state_dict(obj)
        config = infer_config(sd)
    except (CheckpointError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    for key, types in (("step", int), ("optimizer", dict), ("scaler", dict), ("schedule", dict), ("data", dict),
                       ("rng", dict), ("args", dict)):
        _need(obj, key, types, path)
    if not isinstance(obj["data"].get("samples_seen"), int) or not isinstance(obj["rng"].get("torch"), torch.Tensor):
        raise CheckpointError(f"{path}: corrupt training state (data position or RNG state)")
    obj["model_state"], obj["config"] = sd, config
    return obj


def restore(obj: dict, path: str, model, optimizer, scaler) -> None:
    """Load a read() checkpoint into the (unwrapped) model, optimizer and scaler; any mismatch is a
    CheckpointError naming the file."""
    try:
        check_keys(model, obj["model_state"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.load_state_dict(obj["model_state"])
    try:
        optimizer.load_state_dict(obj["optimizer"])
        scaler.load_state_dict(obj["scaler"]) if obj["scaler"] else None
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: optimizer/scaler state does not fit this model and optimizer ({e})") \
            from None
    set_rng_state(obj["rng"])
