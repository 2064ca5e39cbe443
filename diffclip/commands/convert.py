"""`diffclip convert SRC DST.safetensors`: a training checkpoint to weights-only safetensors."""

from __future__ import annotations

import os

from ..outputs import AtomicOutputs
from .common import UsageError


def add_parser(sub) -> None:
    cv = sub.add_parser("convert", help="training checkpoint -> weights-only .safetensors")
    cv.add_argument("src", help="checkpoint file or hub id")
    cv.add_argument("dst", help="output .safetensors path")
    cv.add_argument("--fp16", action="store_true", help="store floating weights as float16 (half the size)")
    cv.set_defaults(run=run)


def run(args) -> int:
    import torch

    from ..checkpoint import save_safetensors
    from ..hub import resolve_source
    from ..loading import read_checked

    if not args.dst.endswith(".safetensors"):
        raise UsageError(f"destination must end in .safetensors, got {args.dst}")
    folder = os.path.dirname(os.path.abspath(args.dst))
    if not os.path.isdir(folder):
        raise UsageError(f"destination folder does not exist: {folder}")
    _, config, state_dict = read_checked(resolve_source(args.src), attn_backend="eager")
    with AtomicOutputs(folder, [os.path.basename(args.dst)]) as out:
        save_safetensors(state_dict, out.path(os.path.basename(args.dst)), config,
                         dtype=torch.float16 if args.fp16 else None)
    size = os.path.getsize(args.dst) / 2**20
    print(f"wrote {len(state_dict)} tensors ({size:.1f} MiB) to {args.dst}")
    return 0
