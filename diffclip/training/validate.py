"""--val-data: the contrastive loss and recall@1 both ways on a held-out CSV or set of shards, on rank 0, with
the evaluation transform (resize + center crop). Corrupt samples are skipped and counted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import DataError, read_csv
from .samples import Preprocess, SampleError, eval_transform
from .wds import CAPTION_KEY, IMAGE_KEYS, expand_shards, shard_samples


def _items(spec, args):
    if spec.lower().endswith((".csv", ".tsv")):
        return read_csv(spec, args.csv_image_key, args.csv_caption_key, args.csv_separator)
    items, errors = [], []
    for shard in expand_shards(spec):
        for s in shard_samples(shard, errors):
            items.append((next((s[k] for k in IMAGE_KEYS if k in s), None),
                          s[CAPTION_KEY].decode("utf-8", errors="replace") if CAPTION_KEY in s else None))
    if errors:
        raise DataError(f"--val-data: {errors[0]}")
    return items


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, items, pre):
        self.items, self.pre = items, pre

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            return self.pre(*self.items[i], i)
        except SampleError:
            return None


def _collate(batch):
    good = [b for b in batch if b is not None]
    images = torch.stack([g[0] for g in good]) if good else None
    texts = torch.stack([g[1] for g in good]) if good else None
    return images, texts, len(batch) - len(good)


def make(spec, model, config, tokenizer, device, precision, args):
    """A function computing the validation metrics; the data is checked (and listed) now, decoded at each call."""
    from open_clip.loss import ClipLoss

    from . import optim

    items = _items(spec, args)
    if not items:
        raise DataError(f"--val-data {spec} holds no samples")
    pre = Preprocess(eval_transform(config.vision_img_size), tokenizer, args.seed)
    loss_fn = ClipLoss()

    def run() -> dict:
        loader = torch.utils.data.DataLoader(_Decoded(items, pre), batch_size=args.val_batch_size,
                                             num_workers=min(args.workers, 4), collate_fn=_collate)
        was_training = model.training
        model.eval()
        imgs, txts, losses, skipped = [], [], [], 0
        try:
            with torch.no_grad(), optim.autocast(precision, device):
                for images, texts, bad in loader:
                    skipped += bad
                    if images is None:
                        continue
                    out = model(images.to(device), texts.to(device))
                    img = F.normalize(out["image_embed"].float(), dim=-1)
                    txt = F.normalize(out["text_embed"].float(), dim=-1)
                    losses.append((float(loss_fn(img, txt, out["logit_scale"].float())), img.shape[0]))
                    imgs.append(img)
                    txts.append(txt)
        finally:
            model.train(was_training)
        if not imgs:
            raise DataError(f"--val-data {spec}: every sample was corrupt or incomplete")
        img, txt = torch.cat(imgs), torch.cat(txts)
        sim = img @ txt.T
        target = torch.arange(sim.shape[0], device=sim.device)
        return {"loss": sum(v * n for v, n in losses) / sum(n for _, n in losses),
                "image_to_text_R@1": float((sim.argmax(1) == target).float().mean()),
                "text_to_image_R@1": float((sim.argmax(0) == target).float().mean()),
                "samples": int(sim.shape[0]), "skipped": skipped}

    return run
