"""`diffclip train`: contrastive training / fine-tuning on one process or many (torchrun), resumable.

Arguments are checked before anything heavy happens; user errors are `TrainUsageError` (a ValueError: the CLI
prints one line and exits with status 2).
"""

from __future__ import annotations

import argparse
import math
import os


class TrainUsageError(ValueError):
    pass


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="contrastive training or fine-tuning (one GPU, or many with torchrun)",
                       description="Train DiffCLIP with CLIP's contrastive loss. RUN_DIR gets checkpoint_last.pt "
                       "(loadable with diffclip.load), checkpoint_step<N>.pt with --save-every, and log.jsonl.")
    p.add_argument("--train-data", required=True, help="CSV file, or webdataset shards: a brace pattern "
                   "(data/{00000..00099}.tar), a folder of .tar files, or one .tar")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--init", metavar="CHECKPOINT_OR_HUB_ID", help="start from these weights (fine-tuning)")
    src.add_argument("--config", help="start from random weights: vit_b16, or a .json file of DiffCLIPConfig fields")
    p.add_argument("--data-type", choices=["webdataset", "csv"], help="default: csv for a .csv file, else webdataset")
    p.add_argument("--csv-image-key", default="image", help="CSV column of image paths (relative to the CSV's folder)")
    p.add_argument("--csv-caption-key", default="caption", help="CSV column of captions")
    p.add_argument("--csv-separator", default=",", help="CSV field separator (default ','; '\\t' for TSV)")
    p.add_argument("--train-num-samples", type=int, help="webdataset: samples per epoch (for --epochs and the "
                   "epoch in the log; default: the img2dataset *_stats.json files beside the shards)")
    length = p.add_mutually_exclusive_group(required=True)
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data (rounded up to whole steps)")
    p.add_argument("--batch-size", type=int, default=64, help="per process and micro-batch (default 64)")
    p.add_argument("--accum-freq", type=int, default=1, help="micro-batches per optimizer step; the contrastive "
                   "loss spans all of them (default 1)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--wd", type=float, default=0.5, help="AdamW weight decay (not on biases, norm gains, λ "
                   "vectors, logit scale, embeddings)")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: 1/40 of the run, i.e. one epoch of "
                   "the paper's 40)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], help="autocast dtype (weights stay fp32); "
                   "default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attn-backend", default="auto", choices=["auto", "triton", "sdpa", "eager"])
    p.add_argument("--device", help="cpu, cuda (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per process (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="also keep checkpoint_step<N>.pt every N steps")
    p.add_argument("--log-every", type=int, default=10, help="log.jsonl line every N steps (default 10)")
    p.add_argument("--resume", help="RUN_DIR, a checkpoint file, or 'latest' (RUN_DIR/checkpoint_last.pt of --out "
                   "if it exists, else a fresh start: rerun the same command after a preemption)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in the backward")
    p.add_argument("--val-data", help="CSV or webdataset shards: validation loss and retrieval recall@1")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (and at the end)")
    p.add_argument("--val-batch-size", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--strict", action="store_true", help="stop at the first corrupt sample instead of skipping it")
    p.set_defaults(run=run)
    return p


def check_args(args) -> None:
    """Everything that can be checked without loading data or models."""
    for name in ("steps", "batch_size", "accum_freq", "log_every", "train_num_samples", "val_batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise TrainUsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("workers", "save_every", "val_every", "warmup"):
        v = getattr(args, name)
        if v is not None and v < 0:
            raise TrainUsageError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
    if args.epochs is not None and not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise TrainUsageError(f"--epochs must be > 0, got {args.epochs}")
    if not (args.lr > 0 and math.isfinite(args.lr)) or args.wd < 0 or args.eps <= 0:
        raise TrainUsageError("--lr and --eps must be > 0 and --wd >= 0")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        raise TrainUsageError("--beta1 and --beta2 must lie in [0, 1)")
    if args.init is None and args.config is None and args.resume is None:
        raise TrainUsageError("give --init CHECKPOINT_OR_HUB_ID (fine-tune) or --config vit_b16 (from scratch), "
                              "or --resume")
    if args.val_every and not args.val_data:
        raise TrainUsageError("--val-every needs --val-data")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise TrainUsageError(f"--out {args.out} exists and is not a folder")
    if len(args.csv_separator.encode().decode("unicode_escape")) != 1:
        raise TrainUsageError(f"--csv-separator must be one character, got {args.csv_separator!r}")
    args.csv_separator = args.csv_separator.encode().decode("unicode_escape")


def _device(args, world):
    import torch

    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            raise TrainUsageError(f"bad --device {args.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainUsageError("--device cuda: CUDA is not available here")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else
                              torch.cuda.current_device())
    return device


def _open_data(args, world):
    """(source kind, rows or shard list, epoch size or None), checked: a missing file or an empty shard list is a
    usage error here, before the model is built."""
    from ..training import data, wds

    kind = args.data_type or ("csv" if args.train_data.lower().endswith((".csv", ".tsv")) else "webdataset")
    if kind == "csv":
        try:
            rows = data.read_csv(args.train_data, args.csv_image_key, args.csv_caption_key, args.csv_separator)
        except data.DataError as e:
            raise TrainUsageError(str(e)) from None
        return kind, rows, len(rows)
    try:
        import webdataset  # noqa: F401 - its tar reader parses the shards
    except ImportError:
        raise TrainUsageError("webdataset shards need the webdataset package: pip install 'diffclip-triton[train]'") \
            from None
    shards = wds.expand_shards(args.train_data)
    wds.check_split(shards, world, args.workers, args.train_data)
    return kind, shards, args.train_num_samples or wds.img2dataset_count(shards)


def run(args) -> int:
    import torch

    from .. import distributed
    from ..text import get_tokenizer
    from ..training import checkpoint_io, data, loop, modeling, monitor, optim, samples, validate, wds

    check_args(args)
    resume_path = checkpoint_io.resolve_resume(args.resume, args.out) if args.resume else None
    if resume_path is None and os.path.isfile(os.path.join(args.out, checkpoint_io.LAST)):
        raise TrainUsageError(f"{args.out} already holds a run (checkpoint_last.pt): pass --resume latest to "
                              "continue it, or choose another --out")
    resumed = checkpoint_io.read(resume_path) if resume_path else None  # CheckpointError: a ValueError, exit 2
    if resumed is None and args.init is None and args.config is None:
        raise TrainUsageError(f"--resume {args.resume}: nothing to resume in {args.out}; give --init or --config "
                              "for a fresh start")

    rank, world = distributed.world()
    device = _device(args, world)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    model, config = modeling.build(args, resumed)
    tokenizer = get_tokenizer(config.context_length, config.vocab_size)
    kind, items, epoch_size = _open_data(args, world)
    if resumed is not None and resumed["data"].get("kind") != kind:
        raise TrainUsageError(f"the checkpoint was trained on {resumed['data'].get('kind')} data; --train-data is "
                              f"{kind} (its data position would mean nothing)")
    global_batch = world * args.batch_size * args.accum_freq
    if args.steps is not None:
        total = args.steps
    elif epoch_size:
        total = math.ceil(args.epochs * epoch_size / global_batch)
    else:
        raise TrainUsageError("--epochs with webdataset needs the number of samples: --train-num-samples N (or "
                              "img2dataset's *_stats.json files beside the shards)")
    warmup = args.warmup if args.warmup is not None else math.ceil(total / 40)

    if args.grad_checkpointing:
        modeling.enable_grad_checkpointing(model)
    model.to(device)
    optimizer = optim.build_optimizer(model, args.lr, args.wd, (args.beta1, args.beta2), args.eps)
    scaler = optim.build_scaler(precision, device)
    start_step, start_position, wds_positions, wds_batches = 0, 0, None, 0
    if resumed is not None:
        checkpoint_io.restore(resumed, resume_path, model, optimizer, scaler)
        start_step, start_position = resumed["step"], resumed["data"]["samples_seen"]
        wds_positions, wds_batches = resumed["data"].get("positions"), resumed["data"].get("batches", 0)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        checkpoint_io.remove_stale_parts(args.out)
    distributed.barrier(world)

    pre = samples.Preprocess(samples.train_transform(config.vision_img_size), tokenizer, args.seed)
    if kind == "csv":
        loader = data.csv_loader(items, pre, rank=rank, world=world, batch_size=args.batch_size,
                                 accum=args.accum_freq, start_step=start_step, total_steps=total,
                                 start_position=start_position, workers=args.workers, seed=args.seed,
                                 strict=args.strict)
        source = data.CsvPosition(start_position, global_batch, args.accum_freq)
    else:
        loader, source = wds.loader(items, pre, rank=rank, world=world, batch_size=args.batch_size,
                                    workers=args.workers, seed=args.seed, strict=args.strict,
                                    positions=wds_positions, start_position=start_position,
                                    global_batch=global_batch, accum=args.accum_freq, batches=wds_batches)

    ddp = None
    fwd = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
        fwd = ddp
    if args.compile:
        fwd = torch.compile(fwd)
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world)
    val_fn = None
    if args.val_data:
        val_fn = validate.make(args.val_data, model, config, tokenizer, device, precision, args)
    mon = monitor.Monitor(args.out, rank == 0, start_step, total)
    trainer = loop.Trainer(model=model, fwd=fwd, ddp=ddp, optimizer=optimizer, scaler=scaler, loss_fn=loss_fn,
                           device=device, rank=rank, world=world, precision=precision, accum=args.accum_freq,
                           strict=args.strict, monitor=mon)
    if rank == 0:
        what = f"resuming {resume_path} at step {start_step}" if resumed else "starting"
        mon.write(f"diffclip train: {what}; {total} steps of {global_batch} images ({world} process(es) x "
                  f"{args.batch_size} x {args.accum_freq}), {kind} data, {precision}, "
                  f"attention {model.attn_backend}, warm-up {warmup}; {mon.tensorboard_note()}")
    try:
        if start_step < total:
            loop.run(trainer, loader, source, start_step=start_step, total_steps=total, base_lr=args.lr,
                     warmup=warmup, run_dir=args.out, save_every=args.save_every, log_every=args.log_every,
                     val_fn=val_fn, val_every=args.val_every or total, args_dict=vars(args),
                     epoch_size=epoch_size)
    finally:
        mon.close()
    skipped, trimmed = trainer.reduce([trainer.skipped, trainer.trimmed], op="sum")
    if rank == 0:
        line = f"done: step {total}, {os.path.join(args.out, checkpoint_io.LAST)}"
        line += f"; skipped {int(skipped)} corrupt or incomplete sample(s)"
        if trainer.first_errors:
            line += f" (first: {trainer.first_errors[0]})"
        if trimmed:
            line += f"; left out {int(trimmed)} good sample(s) to keep the ranks' batches equal"
        print(line)
    return 0
