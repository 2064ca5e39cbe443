"""The `--dataset NAME` route of `diffclip eval`: a CLIP Benchmark dataset (its builder, class names, templates,
metric code; diffclip/named_datasets.py) with our sharding over torchrun processes."""

from __future__ import annotations

import os
import sys

from .. import distributed
from . import loaders
from .common import UsageError


def evaluate(args, model, tokenizer, device, rank, world, nd):
    """A CLIP Benchmark dataset: its builder, class names, templates and metric code; our sharding."""
    import time

    import torch

    from .. import named_datasets

    task = "zeroshot_classification" if args.task == "zeroshot" else "zeroshot_retrieval"
    where = f"{args.dataset} (split {args.split}) in {args.data_root}"
    if task == "zeroshot_classification":
        weights = distributed.sharded_rows(
            lambda names: named_datasets.class_embeddings(model, tokenizer, names, nd.templates, device),
            nd.classnames, model.config.embed_dim, device, rank, world)
    t0 = time.perf_counter()
    try:
        local, extras = _embed_rank_batches(args, model, tokenizer, device, nd, rank, world)
        error = None
    except UsageError as e:
        error = str(e)
    distributed.agree(error, world, UsageError)  # a bad image on one rank: it reports, the others end quietly
    n_total = sum(distributed.gather_objects(local.shape[0], world))
    if n_total == 0:
        raise UsageError(f"{where} holds no images")
    img = distributed.gather_rows(local, n_total, rank, world)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = n_total / (time.perf_counter() - t0)
    if task == "zeroshot_classification":
        targets = _gather_targets(extras, n_total, len(nd.classnames), device, rank, world)
        return named_datasets.classification_metrics(100.0 * img @ weights.T, targets, len(nd.classnames)), rate
    txt, owner = _gather_captions(extras, n_total, model.config.embed_dim, world)
    if txt.shape[0] == 0:
        raise UsageError(f"{where} holds no captions")
    return named_datasets.retrieval_metrics(img, txt, owner, args.batch_size, args.recall_k), rate


def _embed_rank_batches(args, model, tokenizer, device, nd, rank, world):
    """This rank's normalised image embeddings (n, D), and per batch its targets (classification) or (captions per
    image, their normalised embeddings) (retrieval)."""
    import torch
    from tqdm import tqdm

    dim, normalize = model.config.embed_dim, torch.nn.functional.normalize
    images, extras = [torch.zeros(0, dim, device=device)], []
    with torch.no_grad():
        batches = rank_batches(nd, rank, world, args.batch_size, args.num_workers)
        for batch, extra in tqdm(batches, desc="images", unit="batch", disable=True if rank != 0 else None):
            images.append(normalize(model.encode_image(batch.to(device)).float(), dim=-1))
            if nd.task == "zeroshot_classification":
                extras.append(torch.as_tensor(extra))
                continue
            texts = [list(t) if isinstance(t, (list, tuple)) else [t] for t in extra]
            flat = [c for t in texts for c in t]
            emb = [torch.zeros(0, dim, device=device)] + [
                model.encode_text(tokenizer(flat[i:i + args.text_batch_size]).to(device)).float()
                for i in range(0, len(flat), args.text_batch_size)]
            extras.append(([len(t) for t in texts], normalize(torch.cat(emb), dim=-1).cpu()))
    return torch.cat(images), extras


def rank_batches(nd, rank: int, world: int, batch_size: int, num_workers: int):
    """(images, targets or caption lists) of this rank's items, items[rank::world] in the dataset's order, in
    batches; an unreadable item is a UsageError naming it. A map-style dataset is subset (each rank loads only its
    items); a webdataset stream is read whole by every rank (no random access) and filtered, so only the model's
    work is divided."""
    from torch.utils.data import DataLoader, default_collate

    if not nd.iterable:
        subset = loaders.Guarded(nd.dataset, range(rank, len(nd.dataset), world))
        collate = loaders.guarded_collate(nd.collate_fn or default_collate)
        for batch in DataLoader(subset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate):
            yield loaders.check(batch)
        return
    # As CLIP Benchmark loads webdatasets: batched by webdataset itself (its collation keeps caption lists). A
    # worker with no shard of its own fails in webdataset: at most one worker per shard.
    workers = min(num_workers, _wds_shards(nd))
    if workers < num_workers and rank == 0:
        print(f"diffclip: note: {nd.name} has {_wds_shards(nd)} shard(s): {workers} loader worker(s) instead of "
              f"--num-workers {num_workers}", file=sys.stderr)
    loader = DataLoader(loaders.GuardedStream(nd.dataset.batched(batch_size)), batch_size=None, num_workers=workers)
    start = 0
    for item in loader:
        images, extra = loaders.check(item)
        mine = [j for j in range(len(images)) if (start + j) % world == rank]
        start += len(images)
        if mine:
            # class indices come as a tensor or a NumPy array (webdataset's collation), captions as a list
            yield images[mine], (extra[mine] if hasattr(extra, "shape") else [extra[j] for j in mine])


def _wds_shards(nd) -> int:
    from ..dataset_files import is_url

    if is_url(nd.root):  # streamed (--download): its shard count is not read here
        return sys.maxsize
    with open(os.path.join(nd.root, nd.split, "nshards.txt"), encoding="utf-8") as f:
        return int(f.read().strip())


def _gather_targets(extras, n_total, n_classes, device, rank, world):
    """Class indices (N,), or (N, classes) 0/1 rows of a multi-label set, in item order on every rank (the ranks
    agree on the width, also one that holds no item)."""
    import torch

    local = torch.cat(extras) if extras else torch.zeros(0, dtype=torch.long)
    multilabel = max(distributed.gather_objects(local.dim(), world)) == 2
    width = n_classes if multilabel else 1
    rows = local.reshape(local.shape[0], width).to(device=device, dtype=torch.float64)
    targets = distributed.gather_rows(rows, n_total, rank, world).cpu()
    return targets if multilabel else targets[:, 0].long()


def _gather_captions(extras, n_total, dim, world):
    """All caption embeddings in item order (image 0's captions, then image 1's, ...) and the image index of
    each. Rank r holds images r, r+world, ...: every image's caption block is put back in place."""
    import torch

    per_rank = distributed.gather_objects((
        [n for counts, _ in extras for n in counts],
        torch.cat([torch.zeros(0, dim)] + [e for _, e in extras])), world)
    offsets = []
    for counts, _ in per_rank:
        offsets.append([0])
        for n in counts:
            offsets[-1].append(offsets[-1][-1] + n)
    blocks, owner = [torch.zeros(0, dim)], []
    for i in range(n_total):
        r, p = i % world, i // world
        a, b = offsets[r][p], offsets[r][p + 1]
        blocks.append(per_rank[r][1][a:b])
        owner += [i] * (b - a)
    return torch.cat(blocks), torch.tensor(owner, dtype=torch.long)
