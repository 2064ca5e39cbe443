"""`diffclip eval zeroshot|retrieval`: metrics on an ImageFolder tree / image,caption CSV (`--data`) or on a CLIP
Benchmark dataset (`--dataset`, see eval_named.py); one process or torchrun."""

from __future__ import annotations

import json
import os
import sys

from .. import distributed
from ..outputs import AtomicOutputs, check_output_file
from . import loaders
from .common import UsageError, add_model_args, check_template, default_workers, load_model, read_lines


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="zero-shot classification or retrieval metrics on a labelled dataset")
    evsub = ev.add_subparsers(dest="task", required=True)
    zs_ev = evsub.add_parser("zeroshot", help="ImageFolder tree (one sub-folder per class) or a CLIP Benchmark "
                             "dataset: acc1, acc5, mean per-class recall")
    zs_src = zs_ev.add_mutually_exclusive_group(required=True)
    zs_src.add_argument("--data", help="folder with one sub-folder of images per class")
    zs_ev.add_argument("--classnames", help="file with one class name per line, in sorted-folder / the dataset's "
                       "order (default: the folder names, '_' read as a space; CLIP Benchmark's for --dataset)")
    zs_ev.add_argument("--templates", help="file with one prompt template per line, {} or CLIP Benchmark's {c} "
                       "marks the class name (default: the 80 ImageNet templates of CLIP; CLIP Benchmark's for "
                       "--dataset)")
    rt_ev = evsub.add_parser("retrieval", help="CSV with columns image,caption, or a CLIP Benchmark dataset: "
                             "recall@1/5/10 both ways")
    rt_src = rt_ev.add_mutually_exclusive_group(required=True)
    rt_src.add_argument("--data", help="CSV file; image paths relative to its folder")
    rt_ev.add_argument("--recall-k", default="1,5,10", help="comma-separated k of recall@k (default %(default)s)")
    for q, src in ((zs_ev, zs_src), (rt_ev, rt_src)):
        src.add_argument("--dataset", help="a dataset of LAION's CLIP Benchmark (imagenet1k, cifar10, "
                         "mscoco_captions, flickr30k, wds/NAME, ...), built with its builder, class names, "
                         "templates and metrics; needs pip install -e '.[eval]'")
        q.add_argument("--data-root", help="with --dataset: the folder holding it (CLIP Benchmark's layout)")
        q.add_argument("--split", help="with --dataset: the split (default: test)")
        q.add_argument("--download", action="store_true",
                       help="with --dataset: let CLIP Benchmark download missing files (default: refuse)")
        q.add_argument("--batch-size", type=int, default=64)
        q.add_argument("--num-workers", type=int, default=default_workers(),
                       help="image-loading worker processes (default: %(default)s, CLIP Benchmark's 4 where the cores "
                       "allow)")
        q.add_argument("--text-batch-size", type=int, default=256, help="prompts/captions per model call "
                       "(default 256)")
        q.add_argument("--json", help="write the result here (CLIP Benchmark's layout)")
        add_model_args(q)
    ev.set_defaults(run=run)


def _encode_images(model, preprocess, paths, args, device, rank=0, world=1):
    """(N, D) L2-normalised image embeddings of all paths, in order, and images/s. Under torchrun each rank encodes
    paths[rank::world] and the embeddings are all-gathered."""
    import time

    import torch
    from torch.utils.data import DataLoader, default_collate
    from tqdm import tqdm

    shard = paths[rank::world]
    loader = DataLoader(loaders.ImagePaths(shard, preprocess), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=loaders.guarded_collate(default_collate))
    chunks, t0, error = [], time.perf_counter(), None
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="images", unit="batch", disable=True if rank != 0 else None):
                batch = loaders.check(batch)
                chunks.append(torch.nn.functional.normalize(model.encode_image(batch.to(device)).float(), dim=-1))
    except UsageError as e:
        error = str(e)
    distributed.agree(error, world, UsageError)  # a bad image on one rank: it reports, the others end quietly
    dim = model.config.embed_dim
    local = torch.cat(chunks) if chunks else torch.zeros(0, dim, device=device)
    emb = distributed.gather_rows(local, len(paths), rank, world)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return emb, len(paths) / (time.perf_counter() - t0)


def _eval_folder_or_csv(args, model, preprocess, tokenizer, device, rank, world, inputs):
    """Our own formats: an ImageFolder tree (zero-shot) or an image,caption CSV (retrieval)."""
    import torch

    from .. import evaluate

    if args.task == "zeroshot":
        samples, classnames, templates = inputs
        weights = distributed.sharded_rows(
            lambda names: evaluate.zeroshot_classifier(model, tokenizer, names, templates, device,
                                                       args.text_batch_size),
            classnames, model.config.embed_dim, device, rank, world)
        emb, rate = _encode_images(model, preprocess, [p for p, _ in samples], args, device, rank, world)
        targets = torch.tensor([c for _, c in samples], device=emb.device)
        return evaluate.classification_metrics(emb @ weights.T, targets), rate
    images, captions, owner = inputs
    emb, rate = _encode_images(model, preprocess, images, args, device, rank, world)
    b, mine = args.text_batch_size, captions[rank::world]  # captions sharded by rank too, gathered in order
    with torch.no_grad():
        txt = torch.cat([torch.zeros(0, model.config.embed_dim, device=device)] + [
            model.encode_text(tokenizer(mine[i:i + b]).to(device)).float() for i in range(0, len(mine), b)])
    txt = distributed.gather_rows(torch.nn.functional.normalize(txt, dim=-1), len(captions), rank, world)
    return evaluate.retrieval_metrics(emb, txt, torch.tensor(owner, device=emb.device), args.recall_k), rate


def _own_inputs(args):
    """--data: (samples, class names, templates) of an ImageFolder tree or (images, captions, owner) of a CSV,
    checked before the model loads."""
    from .. import evaluate

    if args.task == "zeroshot":
        folders, samples, skipped = evaluate.image_folder(args.data)
        if skipped:  # torchvision's ImageFolder skips them too; say so rather than drop them silently
            print(f"diffclip: note: {len(skipped)} file(s) in {args.data} skipped, not an image suffix torchvision's "
                  f"ImageFolder reads (e.g. {skipped[0]})", file=sys.stderr)
        classnames = ([c.replace("_", " ") for c in folders] if not args.classnames
                      else read_lines(args.classnames, "class-name"))
        if len(classnames) != len(folders):
            raise UsageError(f"--classnames has {len(classnames)} names for {len(folders)} class folders")
        templates = [check_template(t) for t in read_templates(args)] if args.templates else \
            evaluate.imagenet_templates()
        return samples, classnames, templates
    images, captions, owner = evaluate.caption_csv(args.data)
    for p in images:
        if not os.path.isfile(p):
            raise UsageError(f"image not found: {p} (listed in {args.data})")
    return images, captions, owner


def read_templates(args) -> list[str]:
    """--templates, one per line; CLIP Benchmark's `{c}` is read as `{}`."""
    return [t.replace("{c}", "{}") for t in read_lines(args.templates, "template")]


def _named_inputs(args):
    """--dataset: the CLIP Benchmark dataset, built (not read) before the model loads so that a wrong name,
    split or missing file is reported at once; its transform is set once the model is loaded."""
    from .. import named_datasets

    if not args.data_root:
        raise UsageError("--dataset needs --data-root DIR (the folder holding the dataset in CLIP Benchmark's layout)")
    args.split = args.split or "test"
    task = "zeroshot_classification" if args.task == "zeroshot" else "zeroshot_retrieval"
    deferred = named_datasets.DeferredTransform()
    nd = named_datasets.build(args.dataset, args.data_root, args.split, task, deferred, args.download)
    if args.task == "zeroshot" and args.classnames:  # as CLIP Benchmark's --custom_classname_file, one per line
        names = read_lines(args.classnames, "class-name")
        if len(names) != len(nd.classnames):
            raise UsageError(f"--classnames has {len(names)} names for the {len(nd.classnames)} classes of "
                             f"{args.dataset}")
        nd.classnames = names
    if args.task == "zeroshot" and args.templates:  # its templates use {c}
        nd.templates = [check_template(t).replace("{}", "{c}") for t in read_templates(args)]
    return nd, deferred


def run(args) -> int:
    import torch

    from . import eval_named

    if args.batch_size < 1 or args.text_batch_size < 1 or args.num_workers < 0:
        raise UsageError("--batch-size and --text-batch-size must be >= 1, --num-workers >= 0")
    json_path = check_output_file(args.json, "--json") if args.json else None  # before any work is done
    if args.dataset is not None:
        inputs, deferred = _named_inputs(args)
    elif args.data_root or args.download or args.split:
        raise UsageError("--data-root, --split and --download apply to --dataset")
    else:
        inputs = _own_inputs(args)
    if args.task == "retrieval":
        try:
            args.recall_k = tuple(sorted({int(k) for k in args.recall_k.split(",") if k.strip()}))
        except ValueError:
            args.recall_k = ()
        if not args.recall_k or min(args.recall_k) < 1:
            raise UsageError("--recall-k wants comma-separated integers >= 1, e.g. 1,5,10")
    rank, world = distributed.world()
    if world > 1 and args.device is None and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"
    model, preprocess, tokenizer = load_model(args)
    device = next(model.parameters()).device
    if args.dataset is not None:
        deferred.set(preprocess)
        metrics, rate = eval_named.evaluate(args, model, tokenizer, device, rank, world, inputs)
    else:
        metrics, rate = _eval_folder_or_csv(args, model, preprocess, tokenizer, device, rank, world, inputs)
    task = "zeroshot_classification" if args.task == "zeroshot" else "zeroshot_retrieval"
    name = args.dataset if args.dataset is not None else os.path.basename(os.path.normpath(args.data))
    result = {"dataset": name, "model": "diffclip", "pretrained": args.checkpoint, "task": task,
              "metrics": {k: _finite_or_none(v) for k, v in metrics.items()}, "language": "en",
              "images_per_s": rate, "backend": model.attn_backend,
              "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "device": str(device),
              "processes": world}
    if args.dataset is not None:
        result["split"] = args.split
    if rank != 0:  # rank 0 prints and writes
        return 0
    for k, v in metrics.items():
        print(f"{k}: {v:.4f}")
    print(f"{rate:.1f} images/s")
    if json_path:
        folder, base = os.path.split(json_path)
        with AtomicOutputs(folder, [base]) as out:
            with open(out.path(base), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2, allow_nan=False)
    return 0


def _finite_or_none(v):
    """JSON has no NaN: a metric that is not a number is written as null."""
    import math

    return v if math.isfinite(v) else None
