"""`diffclip embed DIR --out OUT`: embed every image of a folder (and optionally captions); one process writes
plain arrays, torchrun K processes write K shards + index.json (see diffclip/embeddings.py)."""

from __future__ import annotations

import json
import os

from .. import distributed
from ..image import IMAGE_SUFFIXES
from ..outputs import AtomicOutputs, FolderLock, remove_temporaries
from . import loaders
from .common import UsageError, add_model_args, default_workers, load_model, read_lines


def add_parser(sub) -> None:
    em = sub.add_parser("embed", help="embed every image in a folder (and optionally captions)")
    em.add_argument("dir", help="folder of images (not recursive)")
    em.add_argument("--out", required=True, help="output folder: image_embeddings.npy + paths.txt")
    em.add_argument("--text", help="file of captions, one per line: text_embeddings.npy + texts.txt")
    em.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    em.add_argument("--text-batch-size", type=int, default=256, help="captions per model call (default 256)")
    em.add_argument("--num-workers", type=int, default=default_workers(),
                    help="image-decoding worker processes (default: %(default)s, CLIP Benchmark's 4 where the "
                    "cores allow)")
    em.add_argument("--no-normalize", action="store_true", help="save raw embeddings instead of unit-norm ones")
    add_model_args(em)
    em.set_defaults(run=run)


def _listing(folder: str) -> list[str]:
    """The images of `folder`, sorted; names that paths.txt cannot hold (line breaks, not UTF-8) refused now,
    before any image is embedded."""
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    for p in paths:
        if "\n" in p or "\r" in p:  # paths.txt holds one path per line: a newline would misalign every row after it
            raise UsageError(f"file name with a line break in {folder}: {p!r}; rename it")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes (surrogate escapes): paths.txt is UTF-8
            raise UsageError(f"file name that is not valid UTF-8 in {folder}: {p!r}; rename it") from None
    return paths


def run(args) -> int:
    import torch

    if not os.path.isdir(args.dir):
        raise UsageError(f"not a folder: {args.dir}")
    if args.batch_size < 1 or args.text_batch_size < 1 or args.num_workers < 0:
        raise UsageError("--batch-size and --text-batch-size must be >= 1, --num-workers >= 0")
    paths = _listing(args.dir)
    captions = read_lines(args.text, "caption") if args.text else None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    rank, world = distributed.world()
    lock, error = None, None
    if rank == 0:  # the folder is made and locked before the model loads: a second run is refused at once
        try:
            os.makedirs(args.out, exist_ok=True)
            lock = FolderLock(args.out).acquire()
            remove_temporaries(args.out, _OUTPUT_NAMES)  # of a run that was killed (we hold the lock)
        except OSError as e:  # OutputError included
            error = str(e)
    try:
        distributed.agree(error, world, UsageError)
        return _embed(args, paths, captions, rank, world, torch)
    finally:
        if lock is not None:
            lock.release()


_OUTPUT_NAMES = ("image_embeddings", "text_embeddings", "paths.txt", "texts.txt", "index.json")


def _embed(args, paths, captions, rank, world, torch) -> int:
    import time

    import numpy as np
    from torch.utils.data import DataLoader, default_collate
    from tqdm import tqdm

    from .. import embeddings

    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"
    model, preprocess, tokenizer = load_model(args)
    device = next(model.parameters()).device
    dim = model.config.embed_dim

    def finish(x):
        x = x.float()
        return (x if args.no_normalize else torch.nn.functional.normalize(x, dim=-1)).cpu().numpy()

    def encode_images(mine):
        loader = DataLoader(loaders.ImagePaths(mine, preprocess), batch_size=args.batch_size,
                            num_workers=args.num_workers, collate_fn=loaders.guarded_collate(default_collate))
        chunks = [np.zeros((0, dim), dtype=np.float32)]
        for batch in tqdm(loader, desc="images", unit="batch", disable=True if rank != 0 else None):
            chunks.append(finish(model.encode_image(loaders.check(batch).to(device))))
        return np.concatenate(chunks)

    def encode_texts(mine):
        b = args.text_batch_size
        chunks = [np.zeros((0, dim), dtype=np.float32)]
        for i in tqdm(range(0, len(mine), b), desc="texts", unit="batch", disable=True if rank != 0 else None):
            chunks.append(finish(model.encode_text(tokenizer(mine[i:i + b]).to(device))))
        return np.concatenate(chunks)

    t0, error, arrays = time.perf_counter(), None, {}
    try:
        with torch.no_grad():  # this rank's share of each, items[rank::world]
            arrays["image"] = (encode_images(paths[rank::world]), paths)
            rate = len(paths[rank::world]) / (time.perf_counter() - t0)
            if captions is not None:
                arrays["text"] = (encode_texts(captions[rank::world]), captions)
    except UsageError as e:
        error = str(e)
    distributed.agree(error, world, UsageError)  # a bad image on one rank: it reports, the others end quietly
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
        _write_embedding_shards(args, arrays, rank, world, dim)
    rate = sum(distributed.gather_objects(rate, world))
    if rank == 0:
        print(f"wrote {len(paths)} image embeddings" + (f" and {len(captions)} text embeddings" if captions else "")
              + f" to {args.out}" + (f" ({world} shards + index.json)" if world > 1 else "")
              + f"; {rate:.1f} images/s")
    return 0


def _write_embedding_shards(args, arrays, rank, world, dim):
    """torchrun: every rank saves its shard under a temporary name; once all have, rank 0 moves them into place
    together with the merged lists and index.json, and removes an earlier run's outputs. Every rank removes its
    own temporary shard when the run fails. --out must be on a file system every rank sees."""
    import uuid

    import numpy as np

    from .. import embeddings

    run_id = distributed.gather_objects(uuid.uuid4().hex[:12], world)[0]  # rank 0's id, on every rank

    def temp(name):
        return os.path.join(args.out, f".{name}.{run_id}.part")

    mine = [temp(embeddings.shard_name(kind, rank, world)) for kind in arrays]
    try:
        error = None
        try:
            for kind, (array, _) in arrays.items():
                with open(temp(embeddings.shard_name(kind, rank, world)), "wb") as f:
                    np.save(f, array)
        except OSError as e:
            error = f"rank {rank} could not write its shard to {args.out}: {e}"
        distributed.agree(error, world, UsageError)
        if rank == 0:
            try:
                _publish_shards(args, arrays, world, dim, temp)
            except (UsageError, OSError) as e:
                error = str(e)
        # Every rank learns rank 0's outcome (a plain barrier would leave the others waiting on a failed rank 0).
        distributed.agree(error, world, UsageError)
    finally:
        for path in mine:  # published ones were moved away; what is left belongs to a failed run
            if os.path.exists(path):
                os.remove(path)


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
