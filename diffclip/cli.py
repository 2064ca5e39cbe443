"""`diffclip` command line: zero-shot classification, batch embedding, checkpoint conversion.

Errors a user can cause (bad paths, unreadable images, empty label lists, offline hub) print one line and exit
with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
import tempfile

from . import distributed
from .image import IMAGE_SUFFIXES


class UsageError(Exception):
    pass


def _common(p: argparse.ArgumentParser) -> None:
    from .hub import DEFAULT_CHECKPOINT

    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"local .pt/.pth/.safetensors file or hub id (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--backend", default=None, choices=["eager", "sdpa", "triton", "auto"],
                   help="attention backend (default: $DIFFCLIP_ATTN_BACKEND, else auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="model dtype (default: bf16 on CUDA, so that auto picks the fused kernel; fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffclip", description="DiffCLIP: zero-shot, embeddings, conversion.")
    sub = parser.add_subparsers(dest="command", required=True)

    zs = sub.add_parser("zero-shot", help="classify images against text labels")
    zs.add_argument("images", nargs="+", help="image files")
    zs.add_argument("--labels", required=True, help="comma-separated class names, e.g. 'dog,cat,car'")
    zs.add_argument("--template", default="a photo of a {}", help="prompt template with one {} (default: %(default)s)")
    zs.add_argument("--top-k", type=int, default=5, help="labels to show per image (default 5)")
    zs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _common(zs)

    em = sub.add_parser("embed", help="embed every image in a folder (and optionally captions)")
    em.add_argument("dir", help="folder of images (not recursive)")
    em.add_argument("--out", required=True, help="output folder: image_embeddings.npy + paths.txt")
    em.add_argument("--text", help="file of captions, one per line: text_embeddings.npy + texts.txt")
    em.add_argument("--batch-size", type=int, default=32)
    em.add_argument("--no-normalize", action="store_true", help="save raw embeddings instead of unit-norm ones")
    _common(em)

    ev = sub.add_parser("eval", help="zero-shot classification or retrieval metrics on a labelled dataset")
    evsub = ev.add_subparsers(dest="task", required=True)
    zs_ev = evsub.add_parser("zeroshot", help="ImageFolder tree (one sub-folder per class) or a CLIP Benchmark "
                             "dataset: acc1, acc5, mean per-class recall")
    zs_src = zs_ev.add_mutually_exclusive_group(required=True)
    zs_src.add_argument("--data", help="folder with one sub-folder of images per class")
    zs_ev.add_argument("--classnames", help="with --data: file with one class name per line, in sorted-folder "
                       "order (default: the folder names, '_' read as a space)")
    zs_ev.add_argument("--templates", help="with --data: file with one prompt template per line, {} marks the "
                       "class name (default: the 80 ImageNet templates of CLIP)")
    rt_ev = evsub.add_parser("retrieval", help="CSV with columns image,caption, or a CLIP Benchmark dataset: "
                             "recall@1/5/10 both ways")
    rt_src = rt_ev.add_mutually_exclusive_group(required=True)
    rt_src.add_argument("--data", help="CSV file; image paths relative to its folder")
    for q, src in ((zs_ev, zs_src), (rt_ev, rt_src)):
        src.add_argument("--dataset", help="a dataset of LAION's CLIP Benchmark (imagenet1k, cifar10, "
                         "mscoco_captions, flickr30k, wds/NAME, ...), built with its builder, class names, "
                         "templates and metrics; needs pip install -e '.[eval]'")
        q.add_argument("--data-root", help="with --dataset: the folder holding it (CLIP Benchmark's layout)")
        q.add_argument("--split", help="with --dataset: the split (default: test)")
        q.add_argument("--download", action="store_true",
                       help="with --dataset: let CLIP Benchmark download missing files (default: refuse)")
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--num-workers", type=int, default=0, help="image-loading worker processes")
        q.add_argument("--json", help="write the result here (CLIP Benchmark's layout)")
        _common(q)

    cv = sub.add_parser("convert", help="training checkpoint -> weights-only .safetensors")
    cv.add_argument("src", help="checkpoint file or hub id")
    cv.add_argument("dst", help="output .safetensors path")
    cv.add_argument("--fp16", action="store_true", help="store floating weights as float16 (half the size)")

    from .commands import train as train_command  # its own module: diffclip/commands/train.py

    train_command.add_parser(sub)
    return parser


def _device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"bad --device {name!r}: {e}") from None


def _load(args):
    from .loading import load

    device = _device(args.device)
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


def _open_images(paths, preprocess):
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


class AtomicOutputs:
    """Files written under temporary names in the destination folder and moved into place together only when all
    are complete; outputs of an earlier run that this run does not write are removed, so a folder never mixes runs.
    On failure nothing of this run is left behind."""

    def __init__(self, folder: str, names, stale=()):
        self.folder, self.names, self.stale = folder, list(names), list(stale)
        self.tmp = {}

    def __enter__(self):
        for name in self.names:
            fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=self.folder)
            os.close(fd)
            self.tmp[name] = path
        return self

    def path(self, name: str) -> str:
        return self.tmp[name]

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            for path in self.tmp.values():
                if os.path.exists(path):
                    os.remove(path)
            return False
        for name in self.stale:
            target = os.path.join(self.folder, name)
            if name not in self.tmp and os.path.exists(target):
                os.remove(target)
        for name, path in self.tmp.items():
            os.replace(path, os.path.join(self.folder, name))
        return False


def cmd_zero_shot(args) -> int:
    import torch

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        raise UsageError("--labels is empty: give comma-separated class names")
    check_template(args.template)
    if args.top_k < 1:
        raise UsageError("--top-k must be >= 1")
    for p in args.images:
        if not os.path.isfile(p):
            raise UsageError(f"image not found: {p}")
    model, preprocess, tokenizer = _load(args)
    device = next(model.parameters()).device
    images = torch.stack(_open_images(args.images, preprocess)).to(device)
    text = tokenizer([args.template.format(c) for c in labels]).to(device)
    with torch.no_grad():
        out = model(images, text)
    img = torch.nn.functional.normalize(out["image_embed"].float(), dim=-1)
    txt = torch.nn.functional.normalize(out["text_embed"].float(), dim=-1)
    probs = (out["logit_scale"].float() * img @ txt.T).softmax(dim=-1)
    k = min(args.top_k, len(labels))
    result = []
    for path, row in zip(args.images, probs):
        top = row.topk(k)
        result.append({"image": path, "top": [{"label": labels[i], "prob": round(float(p), 6)}
                                              for p, i in zip(top.values, top.indices)]})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in result:
            print(r["image"])
            for t in r["top"]:
                print(f"  {t['prob']:7.2%}  {t['label']}")
    return 0


def cmd_embed(args) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    from . import embeddings

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
    captions = _read_lines(args.text, "caption") if args.text else None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    rank, world = distributed.world()
    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"
    model, preprocess, tokenizer = _load(args)
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
                x = (torch.stack(_open_images(mine[i:i + b], preprocess)) if kind == "image"
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

    from . import embeddings

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

    from . import embeddings

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


def cmd_convert(args) -> int:
    import torch

    from .checkpoint import save_safetensors
    from .hub import resolve_source
    from .loading import read_checked

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


class _ImageDataset:
    """Paths -> preprocessed tensors for a DataLoader; unreadable files raise a UsageError naming them."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return _open_images([self.paths[i]], self.preprocess)[0]


def _encode_images(model, preprocess, paths, args, device, rank=0, world=1):
    """(N, D) L2-normalised image embeddings of all paths, in order, and images/s. Under torchrun each rank encodes
    paths[rank::world] and the embeddings are all-gathered."""
    import time

    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    shard = paths[rank::world]
    loader = DataLoader(_ImageDataset(shard, preprocess), batch_size=args.batch_size, num_workers=args.num_workers)
    chunks, t0 = [], time.perf_counter()
    with torch.no_grad():
        for batch in tqdm(loader, desc="images", unit="batch", disable=rank != 0):
            chunks.append(torch.nn.functional.normalize(model.encode_image(batch.to(device)).float(), dim=-1))
    dim = model.config.embed_dim
    local = torch.cat(chunks) if chunks else torch.zeros(0, dim, device=device)
    emb = distributed.gather_rows(local, len(paths), rank, world)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return emb, len(paths) / (time.perf_counter() - t0)


def _read_lines(path, what):
    if not os.path.isfile(path):
        raise UsageError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise UsageError(f"{what} file is empty: {path}")
    return lines


def _sharded_classifier(class_fn, classnames, dim, device, rank, world):
    """(classes, D) zero-shot weights, classes[rank::world] computed on each rank and all-gathered (per class the
    computation is independent, so this equals one process's result)."""
    import torch

    mine = classnames[rank::world]
    local = class_fn(mine) if mine else torch.zeros(0, dim, device=device)
    return distributed.gather_rows(local.float(), len(classnames), rank, world)


def _eval_folder_or_csv(args, model, preprocess, tokenizer, device, rank, world, inputs):
    """Our own formats: an ImageFolder tree (zero-shot) or an image,caption CSV (retrieval)."""
    import torch

    from . import evaluate

    if args.task == "zeroshot":
        samples, classnames, templates = inputs
        weights = _sharded_classifier(
            lambda names: evaluate.zeroshot_classifier(model, tokenizer, names, templates, device, args.batch_size),
            classnames, model.config.embed_dim, device, rank, world)
        emb, rate = _encode_images(model, preprocess, [p for p, _ in samples], args, device, rank, world)
        targets = torch.tensor([c for _, c in samples], device=emb.device)
        return evaluate.classification_metrics(emb @ weights.T, targets), rate
    images, captions, owner = inputs
    emb, rate = _encode_images(model, preprocess, images, args, device, rank, world)
    with torch.no_grad():
        txt = torch.cat([model.encode_text(tokenizer(captions[i:i + args.batch_size]).to(device)).float()
                         for i in range(0, len(captions), args.batch_size)])
    txt = torch.nn.functional.normalize(txt, dim=-1)
    return evaluate.retrieval_metrics(emb, txt, torch.tensor(owner, device=emb.device)), rate


def _eval_named(args, model, preprocess, tokenizer, device, rank, world):
    """A CLIP Benchmark dataset: its builder, class names, templates and metric code; our sharding."""
    import time

    import torch

    from . import named_datasets

    task = "zeroshot_classification" if args.task == "zeroshot" else "zeroshot_retrieval"
    nd = named_datasets.build(args.dataset, args.data_root, args.split, task, preprocess, args.download)
    where = f"{args.dataset} (split {args.split}) in {args.data_root}"
    if task == "zeroshot_classification":
        weights = _sharded_classifier(
            lambda names: named_datasets.class_embeddings(model, tokenizer, names, nd.templates, device),
            nd.classnames, model.config.embed_dim, device, rank, world)
    t0 = time.perf_counter()
    local, extras = _embed_rank_batches(args, model, tokenizer, device, nd, rank, world)
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
    return named_datasets.retrieval_metrics(img, txt, owner, args.batch_size), rate


def _embed_rank_batches(args, model, tokenizer, device, nd, rank, world):
    """This rank's normalised image embeddings (n, D), and per batch its targets (classification) or (captions per
    image, their normalised embeddings) (retrieval)."""
    import torch
    from tqdm import tqdm

    from . import named_datasets

    dim, normalize = model.config.embed_dim, torch.nn.functional.normalize
    images, extras = [torch.zeros(0, dim, device=device)], []
    with torch.no_grad():
        batches = named_datasets.rank_batches(nd, rank, world, args.batch_size, args.num_workers)
        for batch, extra in tqdm(batches, desc="images", unit="batch", disable=rank != 0):
            images.append(normalize(model.encode_image(batch.to(device)).float(), dim=-1))
            if nd.task == "zeroshot_classification":
                extras.append(torch.as_tensor(extra))
                continue
            texts = [list(t) if isinstance(t, (list, tuple)) else [t] for t in extra]
            flat = [c for t in texts for c in t]
            emb = [torch.zeros(0, dim, device=device)] + [
                model.encode_text(tokenizer(flat[i:i + args.batch_size]).to(device)).float()
                for i in range(0, len(flat), args.batch_size)]
            extras.append(([len(t) for t in texts], normalize(torch.cat(emb), dim=-1).cpu()))
    return torch.cat(images), extras


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


def cmd_eval(args) -> int:
    import torch

    from . import evaluate

    if args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--batch-size must be >= 1 and --num-workers >= 0")
    if args.dataset is not None:
        if not args.data_root:
            raise UsageError("--dataset needs --data-root DIR (the folder holding the dataset in CLIP Benchmark's "
                             "layout)")
        if args.task == "zeroshot" and (args.classnames or args.templates):
            raise UsageError("--classnames/--templates apply to --data; --dataset uses CLIP Benchmark's class names "
                             "and templates")
        from . import named_datasets

        args.split = args.split or "test"
        task = "zeroshot_classification" if args.task == "zeroshot" else "zeroshot_retrieval"
        named_datasets.check(args.dataset, args.data_root, args.split, task, args.download)  # before the model loads
        inputs = None
    elif args.data_root or args.download or args.split:
        raise UsageError("--data-root, --split and --download apply to --dataset")
    elif args.task == "zeroshot":
        folders, samples = evaluate.image_folder(args.data)
        classnames = ([c.replace("_", " ") for c in folders] if not args.classnames
                      else _read_lines(args.classnames, "class-name"))
        if len(classnames) != len(folders):
            raise UsageError(f"--classnames has {len(classnames)} names for {len(folders)} class folders")
        templates = _read_lines(args.templates, "template") if args.templates else evaluate.imagenet_templates()
        for t in templates:
            check_template(t)
        inputs = (samples, classnames, templates)
    else:
        images, captions, owner = evaluate.caption_csv(args.data)
        for p in images:
            if not os.path.isfile(p):
                raise UsageError(f"image not found: {p} (listed in {args.data})")
        inputs = (images, captions, owner)
    rank, world = distributed.world()
    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"
    model, preprocess, tokenizer = _load(args)
    device = next(model.parameters()).device
    if args.dataset is not None:
        metrics, rate = _eval_named(args, model, preprocess, tokenizer, device, rank, world)
    else:
        metrics, rate = _eval_folder_or_csv(args, model, preprocess, tokenizer, device, rank, world, inputs)
    task = "zeroshot_classification" if args.task == "zeroshot" else "zeroshot_retrieval"
    name = args.dataset if args.dataset is not None else os.path.basename(os.path.normpath(args.data))
    result = {"dataset": name, "model": "diffclip", "pretrained": args.checkpoint, "task": task, "metrics": metrics,
              "images_per_s": rate, "backend": model.attn_backend,
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(device),
              "processes": world}
    if args.dataset is not None:
        result["split"] = args.split
    if rank != 0:  # rank 0 prints and writes
        return 0
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json folder does not exist: {folder}")
        with AtomicOutputs(folder, [os.path.basename(args.json)]) as out:
            with open(out.path(os.path.basename(args.json)), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
    return 0


def _cmd_train(args) -> int:
    from .commands import train

    return train.run(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"zero-shot": cmd_zero_shot, "embed": cmd_embed, "convert": cmd_convert, "eval": cmd_eval,
               "train": _cmd_train}[args.command]
    try:
        return handler(args)
    except (UsageError, FileNotFoundError, ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"diffclip: error: {e}", file=sys.stderr)
        return 2
    finally:
        if "torch.distributed" in sys.modules:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
