"""The training loop: contrastive steps with open_clip's ClipLoss, gradient accumulation, DDP, checkpoints, logs.

Loss: open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`: every rank gathers the other ranks'
(normalised) embeddings with their gradient and computes the loss of its own rows against all columns; DDP
averages the gradients, which gives exactly the gradient of one process holding the whole global batch.

Gradient accumulation (`accum`), open_clip's way: the contrastive loss is over the whole accumulated batch
(accum · batch per rank), not over each micro-batch. The micro-batches are first embedded without gradient; then
each is embedded again with gradient and the loss is computed with the cached embeddings of the others as
negatives, and backpropagated (DDP synchronises only the last). The sum of these gradients is the full batch's
gradient, except for the logit scale, which every pass would count again: it takes its gradient from the last
pass only (open_clip counts it `accum` times).
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from . import checkpoint_io, optim
from .data import DataError


def _features(out):
    return F.normalize(out["image_embed"].float(), dim=-1), F.normalize(out["text_embed"].float(), dim=-1)


class Trainer:
    def __init__(self, *, model, fwd, ddp, optimizer, scaler, loss_fn, device, rank, world, precision, accum,
                 strict, monitor):
        self.model, self.fwd, self.ddp = model, fwd, ddp  # raw model, what to call (DDP / compiled), DDP or None
        self.optimizer, self.scaler, self.loss_fn = optimizer, scaler, loss_fn
        self.device, self.rank, self.world, self.precision = device, rank, world, precision
        self.accum, self.strict, self.monitor = accum, strict, monitor
        self.skipped = 0  # corrupt samples skipped on this rank
        self.trimmed = 0  # good samples left out to keep the ranks' batches equal (only when some were skipped)
        self.first_errors: list[str] = []

    def _equal_size(self, batch) -> int:
        """How many samples this micro-batch keeps: all of them, unless corrupt samples made the ranks' batches
        unequal (the gathered loss needs equal sizes): then every rank keeps the smallest size."""
        n = 0 if batch["images"] is None else batch["images"].shape[0]
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([n], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            n_min = int(t)
        else:
            n_min = n
        if n_min == 0:
            raise DataError("every sample of a batch was corrupt or incomplete on some rank (e.g. "
                            f"{(batch['errors'] or ['?'])[0]}); check the data")
        self.trimmed += n - n_min
        return n_min

    def _take(self, batch):
        self.skipped += batch["skipped"]
        if batch["errors"]:
            if self.strict:
                raise DataError(f"corrupt sample (--strict): {batch['errors'][0]}")
            self.first_errors = (self.first_errors + batch["errors"])[:5]
        n = self._equal_size(batch)
        nb = self.device.type == "cuda"
        return batch["images"][:n].to(self.device, non_blocking=nb), batch["texts"][:n].to(self.device, non_blocking=nb)

    def step(self, batches, lr: float) -> tuple[torch.Tensor, int]:
        """One optimizer step over `accum` micro-batches; returns (this rank's loss, detached; images used by this
        rank)."""
        inputs = [self._take(b) for b in batches]
        optim.set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        amp = optim.autocast(self.precision, self.device)
        if len(inputs) == 1:
            with amp:
                out = self.fwd(*inputs[0])
            img, txt = _features(out)
            loss = self.loss_fn(img, txt, out["logit_scale"].float())
            self.scaler.scale(loss).backward()
        else:
            with torch.no_grad(), amp:
                cached = [_features(self.fwd(*x)) for x in inputs]
            for j, x in enumerate(inputs):
                last = j == len(inputs) - 1
                sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
                with sync:
                    with amp:
                        out = self.fwd(*x)
                    img, txt = _features(out)
                    img = torch.cat([c[0] for c in cached[:j]] + [img] + [c[0] for c in cached[j + 1:]])
                    txt = torch.cat([c[1] for c in cached[:j]] + [txt] + [c[1] for c in cached[j + 1:]])
                    scale = out["logit_scale"].float()
                    loss = self.loss_fn(img, txt, scale if last else scale.detach())
                    self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        optim.clamp_logit_scale(self.model)
        return loss.detach(), sum(x[0].shape[0] for x in inputs)

    def reduce(self, values: list[float], op: str = "mean") -> list[float]:
        """Across ranks (a log step): mean or sum of a few numbers."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return [v / self.world if op == "mean" else v for v in t.tolist()]


def run(trainer: Trainer, loader, source, *, start_step, total_steps, base_lr, warmup, run_dir, save_every,
        log_every, val_fn, val_every, args_dict, epoch_size):
    """Train from start_step to total_steps; checkpoint_last.pt at the end (and every save_every steps)."""
    monitor, rank = trainer.monitor, trainer.rank
    schedule = optim.schedule_state(base_lr, warmup, total_steps)
    it = iter(loader)
    t_last, images_since = time.perf_counter(), 0
    step = start_step
    for step in range(start_step, total_steps):
        batches = [next(it) for _ in range(trainer.accum)]
        for b in batches:
            source.on_batch(b)
        lr = optim.cosine_lr(step, base_lr, warmup, total_steps)
        loss, n_images = trainer.step(batches, lr)
        images_since += n_images * trainer.world
        done = step + 1
        monitor.advance()
        if done % log_every == 0 or done == total_steps:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            now = time.perf_counter()
            mean_loss, = trainer.reduce([float(loss)])
            skipped, trimmed = trainer.reduce([trainer.skipped, trainer.trimmed], op="sum")
            row = {"step": done, "loss": mean_loss, "lr": lr, "images_per_s": images_since / (now - t_last),
                   "logit_scale": float(trainer.model.logit_scale.detach().exp()),
                   "samples_seen": source.samples_seen(),
                   "skipped": int(skipped), "trimmed": int(trimmed)}
            if epoch_size:
                row["epoch"] = source.samples_seen() / epoch_size
            if trainer.device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(trainer.device) / 2**30
            monitor.record(row)
            if monitor.bar is not None:
                monitor.bar.set_postfix({"loss": f"{mean_loss:.4f}", "lr": f"{lr:.2e}",
                                         "img/s": f"{row['images_per_s']:.1f}"})
            t_last, images_since = now, 0
        if val_fn is not None and (done % val_every == 0 or done == total_steps):
            metrics = val_fn() if rank == 0 else None
            if rank == 0:
                monitor.record({"step": done, **{f"val/{k}": v for k, v in metrics.items()}})
                monitor.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            _barrier(trainer.world)
        if (save_every and done % save_every == 0) or done == total_steps:
            save(trainer, source, run_dir, done, schedule, args_dict, keep_step=bool(save_every) and
                 done % save_every == 0)
    return step


def save(trainer, source, run_dir, step, schedule, args_dict, keep_step):
    data = source.checkpoint_data()  # collective under torchrun: every rank takes part
    if trainer.rank == 0:
        state = checkpoint_io.build(trainer.model, trainer.optimizer, trainer.scaler, step=step,
                                    samples_seen=source.samples_seen(), data=data, schedule=schedule,
                                    args=args_dict, config=trainer.model.config)
        checkpoint_io.save(run_dir, state, keep_step)
    _barrier(trainer.world)


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
