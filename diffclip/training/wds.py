"""Webdataset training data: tar shards as img2dataset writes them (KEY.jpg|png|webp + KEY.txt [+ KEY.json]).

Split: process r of R takes shards r, r+R, r+2R, ...; inside it, DataLoader worker w of W takes every W-th of
those. Each worker reads its shards in a seeded order that changes every pass, shuffles samples through a buffer
(flushed at the end of each pass, so a pass never repeats a sample), decodes, and builds whole batches; the
loader hands out the workers' batches in turn.

Fewer shards than processes is an error (a process would have no data). A process with fewer shards than
--workers starts only as many workers as it has shards (said at the start). Processes with different shard counts
(shards not a multiple of R) simply start their next pass sooner: steps are counted, not passes, so an "epoch"
here is the number of samples (--train-num-samples, or img2dataset's *_stats.json), not an exact pass.

Resume: every batch carries how many raw samples its worker had read; the checkpoint keeps that count per
(process, worker), and a resumed worker replays its stream up to there without decoding. Exact when resumed
with the same number of processes and workers (otherwise refused).
"""

from __future__ import annotations

import glob
import json
import os
import random
import tarfile

import torch

from .data import DataError
from .samples import SampleError, collate, sample_seed

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
SHUFFLE_BUFFER = 1000


def expand_shards(spec: str) -> list[str]:
    """A brace pattern (a/{000..009}.tar), a glob, a folder of .tar files or one .tar -> existing shard paths.
    An empty list or a missing shard is a DataError."""
    if os.path.isdir(spec):
        shards = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif "{" in spec:
        from braceexpand import braceexpand

        shards = list(braceexpand(spec))
    elif any(c in spec for c in "*?["):
        shards = sorted(glob.glob(spec))
    else:
        shards = [spec]
    if not shards:
        raise DataError(f"empty shard list: {spec} matches no .tar file")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(f"{len(missing)} of {len(shards)} shard(s) of {spec} not found, e.g. {missing[0]}")
    return shards


def check_split(shards, world, workers, spec) -> None:
    if len(shards) < world:
        raise DataError(f"{len(shards)} shard(s) in {spec} for {world} processes: every process needs at least "
                        "one shard (split the data into more shards)")


def rank_shards(shards, rank, world):
    return shards[rank::world]


def effective_workers(n_shards: int, workers: int) -> int:
    return min(workers, n_shards)


def img2dataset_count(shards) -> int | None:
    """Samples in the shards from img2dataset's NNNNN_stats.json ("successes"), if every shard has one."""
    total = 0
    for s in shards:
        stats = s[: -len(".tar")] + "_stats.json" if s.endswith(".tar") else None
        if not stats or not os.path.isfile(stats):
            return None
        try:
            with open(stats, encoding="utf-8") as f:
                total += int(json.load(f)["successes"])
        except (ValueError, KeyError, TypeError, OSError):
            return None
    return total or None


def shard_samples(path: str, errors: list):
    """Samples ({"__key__", "jpg", "txt", ...}) of one shard, with webdataset's tar reader and key grouping. A
    corrupt or truncated shard ends early with its error recorded."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        with open(path, "rb") as f:
            files = ({**x, "__url__": path} for x in tar_file_iterator(f))
            yield from group_by_keys(files)
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        errors.append(f"shard {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


class WdsStream(torch.utils.data.IterableDataset):
    def __init__(self, shards, preprocess, batch_size, seed, rank, strict, start, first_worker=0,
                 buffer=SHUFFLE_BUFFER):
        self.shards, self.pre, self.b, self.seed, self.rank = shards, preprocess, batch_size, seed, rank
        self.strict, self.start, self.first, self.buffer = strict, start, first_worker, buffer

    def _raw(self, mine, w, shard_errors):
        """This worker's endless sample stream: per pass, a seeded shard order and a seeded buffer shuffle."""
        for p in range(2**62):
            order = list(mine)
            random.Random(sample_seed(self.seed, self.rank, w, p)).shuffle(order)
            rng = random.Random(sample_seed(self.seed, self.rank, w, p, 1))
            buf = []
            for shard in order:
                for s in shard_samples(shard, shard_errors):
                    buf.append(s)
                    if len(buf) >= self.buffer:
                        yield buf.pop(rng.randrange(len(buf)))
            rng.shuffle(buf)
            yield from buf

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # The loader takes batches from its workers in turn, starting with worker 0; a resumed run must start with
        # the worker whose turn was next, so loader worker i plays logical worker (first + i) mod W.
        w = (w + self.first) % n_workers
        mine = self.shards[w::n_workers]  # never empty: at most as many workers as shards
        skip, count = self.start[w], 0
        good, errors, shard_errors = [], [], []
        for s in self._raw(mine, w, shard_errors):
            count += 1
            if count <= skip:  # replaying up to a resumed position: read, not decoded
                continue
            errors += shard_errors
            shard_errors.clear()
            image = next((s[k] for k in IMAGE_KEYS if k in s), None)
            try:
                if image is None:
                    raise SampleError(f"no image ({'/'.join(IMAGE_KEYS)})")
                caption = s.get(CAPTION_KEY)
                caption = caption.decode("utf-8", errors="replace") if caption is not None else None
                good.append(self.pre(image, caption, self.rank, w, count))
            except SampleError as e:
                errors.append(f"{s.get('__url__')}:{s.get('__key__')}: {e}")
            if len(good) == self.b or (self.strict and errors):
                yield collate(good, errors, {"worker": w, "consumed": count})
                good, errors = [], []


class WdsPosition:
    """Per-worker read counts of this process; gathered from every process for a checkpoint."""

    def __init__(self, start, world, start_position, global_batch, accum, batches):
        self.counts = list(start)
        self.world, self.start, self.global_batch, self.accum, self.micro = world, start_position, global_batch, \
            accum, 0
        self.batches = batches  # micro-batches this process has taken since the run began (the same on every rank)

    def on_batch(self, batch) -> None:
        self.counts[batch["worker"]] = batch["consumed"]
        self.micro += 1
        self.batches += 1

    def samples_seen(self) -> int:  # images trained on (all processes), the epoch measure for webdataset
        return self.start + (self.micro // self.accum) * self.global_batch

    def checkpoint_data(self) -> dict:
        local = torch.tensor(self.counts, dtype=torch.long)
        if self.world > 1:
            import torch.distributed as dist

            parts = [torch.empty_like(local) for _ in range(self.world)]
            dist.all_gather(parts, local)  # gloo and nccl alike: tiny, on CPU for gloo
            local = torch.stack(parts)
        else:
            local = local[None]
        return {"kind": "webdataset", "positions": local, "batches": self.batches}


def loader(shards, preprocess, *, rank, world, batch_size, workers, seed, strict, positions, start_position,
           global_batch, accum, batches=0):
    mine = rank_shards(shards, rank, world)
    n_workers = effective_workers(len(mine), workers)
    slots = max(1, n_workers)
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dtype != torch.long or positions.dim() != 2:
            raise DataError("the checkpoint's webdataset position is not a (processes, workers) integer tensor")
        if tuple(positions.shape) != (world, slots):
            raise DataError(f"the checkpoint's webdataset position is for {positions.shape[0]} process(es) x "
                            f"{positions.shape[1]} worker(s); resume with the same (now {world} x {slots})")
        start = [int(x) for x in positions[rank]]
    else:
        start = [0] * slots
    if workers > n_workers and rank == 0:
        print(f"diffclip train: {len(mine)} shard(s) per process: starting {n_workers} worker(s), not {workers}")
    ds = WdsStream(mine, preprocess, batch_size, seed, rank, strict, start, first_worker=batches % slots)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=n_workers,
                                     prefetch_factor=2 if n_workers else None)
    return dl, WdsPosition(start, world, start_position, global_batch, accum, batches)
