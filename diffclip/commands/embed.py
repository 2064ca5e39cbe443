"""`diffclip embed DIR --out OUT`: embed every image of a folder (and optionally captions); one process writes
plain arrays, torchrun K processes write K shards + index.json (see diffclip/embeddings.py)."""

from __future__ import annotations

import json
import os

from .. import distributed
from ..image import IMAGE_SUFFIXES
from ..outputs import AtomicOutputs
from .common import UsageError, add_model_args, load_model, open_images, read_lines


def add_parser(sub) -> None:
    em = sub.add_parser("embed", help="embed every image in a folder (and optionally captions)")
    em.add_argument("dir", help="folder of images (not recursive)")
    em.add_argument("--out", required=True, help="output folder: image_embeddings.npy + paths.txt")
    em.add_argument("--text", help="file of captions, one per line: text_embeddings.npy + texts.txt")
    em.add_argument("--batch-size", type=int, default=32)
    em.add_argument("--no-normalize", action="store_true", help="save raw embeddings instead of unit-norm ones")
    add_model_args(em)
    em.set_defaults(run=run)


def run(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from .. import embeddings

    if not os.path.isdir(args.dir):
        raise UsageError(f"not a folder: {args.dir}")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    paths = sorted(os.path.join(args.dir, f) for f in os.listdir(args.dir) if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {args.dir}")
    odd = [p for p in paths if "\n" in p or "\r" in p]
    if odd:  # paths.txt holds one path per line: a newline in a name would misalign every row after it
        raise UsageError(f"file name with a line break in {args.dir}: {odd[0]!r}; rename it")
    captions = read_lines(args.text, "caption") if args.text else None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    rank, world = distributed.world()
    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"
    model, preprocess, tokenizer = load_model(args)
    device = next(model.parameters()).device
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
    distributed.barrier(world)

    def finish(x):
        x = x.float()
        return (x if args.no_normalize else torch.nn.functional.normalize(x, dim=-1)).cpu().numpy()

    def encode(items, kind):  # this rank's share, items[rank::world], as an (n, D) array
        mine, b = items[rank::world], args.batch_size
        chunks = [np.zeros((0, model.config.embed_dim), dtype=np.float32)]
        with torch.no_grad():
            for i in tqdm(range(0, len(mine), b), desc=f"{kind}s", unit="batch", disable=rank != 0):
                x = (torch.stack(open_images(mine[i:i + b], preprocess)) if kind == "image"
                     else tokenizer(mine[i:i + b]))
                chunks.append(finish((model.encode_image if kind == "image" else model.encode_text)(x.to(device))))
        return np.concatenate(chunks)

    arrays = {"image": (encode(paths, "image"), paths)}
    if captions is not None:
        arrays["text"] = (encode(captions, "text"), captions)
    if world == 1:
        names = [n for kind in arrays for n in embeddings.SINGLE[kind]]
        with AtomicOutputs(args.out, names, embeddings.all_output_names(args.out)) as out:
            for kind, (array, items) in arrays.items():
                array_name, list_name = embeddings.SINGLE[kind]
                with open(out.path(array_name), "wb") as f:
                    np.save(f, array)
                with open(out.path(list_name), "w", encoding="utf-8") as f:
                    f.write("\n".join(items) + "\n")
    else:
        _write_embedding_shards(args, arrays, rank, world, model.config.embed_dim)
    if rank == 0:
        print(f"wrote {len(paths)} image embeddings" + (f" and {len(captions)} text embeddings" if captions else "")
              + f" to {args.out}" + (f" ({world} shards + index.json)" if world > 1 else ""))
    return 0


def _write_embedding_shards(args, arrays, rank, world, dim):
    """torchrun: every rank saves its shard under a temporary name; once all have (barrier), rank 0 moves them into
    place together with the merged lists and index.json, and removes an earlier run's outputs. --out must be on a
    file system every rank sees."""
    import uuid

    import numpy as np

    from .. import embeddings

    run_id = distributed.gather_objects(uuid.uuid4().hex[:12], world)[0]  # rank 0's id, on every rank

    def temp(name):
        return os.path.join(args.out, f".{name}.{run_id}.part")

    for kind, (array, _) in arrays.items():
        with open(temp(embeddings.shard_name(kind, rank, world)), "wb") as f:
            np.save(f, array)
    distributed.barrier(world)
    error = None
    if rank == 0:
        try:
            _publish_shards(args, arrays, world, dim, temp)
        except (UsageError, OSError) as e:
            error = e
    # Every rank learns rank 0's outcome (a plain barrier would leave the others waiting on a failed rank 0).
    failed = distributed.gather_objects(None if error is None else str(error), world)[0]
    if error is not None:
        raise error
    if failed:
        raise UsageError(f"rank 0 could not publish the shards: {failed}")


def _publish_shards(args, arrays, world, dim, temp):

    from .. import embeddings

    shards = [embeddings.shard_name(kind, r, world) for kind in arrays for r in range(world)]
    missing = [n for n in shards if not os.path.exists(temp(n))]
    if missing:
        raise UsageError(f"shards missing in {args.out} after all ranks wrote: {', '.join(missing)} (is --out on a "
                         "file system every rank sees?)")
    lists = [embeddings.SINGLE[kind][1] for kind in arrays]
    stale = [n for n in embeddings.all_output_names(args.out) if n not in shards]
    idx = embeddings.index(world, {kind: len(items) for kind, (_, items) in arrays.items()}, dim,
                           normalized=not args.no_normalize)
    with AtomicOutputs(args.out, lists + [embeddings.INDEX], stale) as out:
        for kind, (_, items) in arrays.items():
            with open(out.path(embeddings.SINGLE[kind][1]), "w", encoding="utf-8") as f:
                f.write("\n".join(items) + "\n")
        with open(out.path(embeddings.INDEX), "w", encoding="utf-8") as f:
            json.dump(idx, f, indent=1)
        for n in shards:
            os.replace(temp(n), os.path.join(args.out, n))
