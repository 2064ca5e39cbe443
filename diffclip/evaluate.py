"""Zero-shot classification and image-text retrieval metrics, in CLIP Benchmark's conventions (single process).

- Zero-shot: per class, the mean of the L2-normalised text embeddings over the prompt templates, normalised again;
  metrics `acc1`, `acc5` (top-k capped at the number of classes) and `mean_per_class_recall`.
- Retrieval: `image_retrieval_recall@k` (a caption finds its image among the top k images) and
  `text_retrieval_recall@k` (an image finds any of its captions among the top k captions), k capped at the
  candidate count.
"""

from __future__ import annotations

import csv
import os

import torch
import torch.nn.functional as F

def imagenet_templates() -> list[str]:
    """The 80 ImageNet prompt templates of the CLIP paper (as shipped by open_clip), with `{}` for the class."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def image_folder(root: str) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """(class folder names in sorted order, [(image path, class index)], skipped files) by torchvision's own
    ImageFolder rules (`find_classes`, `make_dataset`: files in sub-folders of a class count, symlinks followed,
    its extensions IMG_EXTENSIONS, case-insensitive). Skipped files are those with another suffix, returned so
    that the caller can say so. Raises ValueError for a missing folder, no class folders or an empty class."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not os.path.isdir(root):
        raise ValueError(f"not a folder: {root}")
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise ValueError(f"no class sub-folders in {root} (expected one folder per class)") from None
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = [0] * len(classes)
    for _, c in samples:
        counts[c] += 1
    if 0 in counts:
        empty = os.path.join(root, classes[counts.index(0)])
        raise ValueError(f"class folder {empty} holds no images ({', '.join(IMG_EXTENSIONS)}, as torchvision's "
                         "ImageFolder reads)")
    taken = {p for p, _ in samples}
    skipped = sorted(os.path.join(d, f) for c in classes
                     for d, _, files in os.walk(os.path.join(root, c), followlinks=True) for f in files
                     if os.path.join(d, f) not in taken)
    return classes, samples, skipped


def caption_csv(path: str) -> tuple[list[str], list[str], list[int]]:
    """(unique image paths in order of first appearance, captions, caption -> image index) from a CSV with the
    columns `image` (relative to the CSV's folder) and `caption`. A UTF-8 byte-order mark (as spreadsheet
    programs write) is accepted; a short row or an empty caption is a ValueError naming its line. Paths are
    resolved before grouping, so `im/0.png`, `./im/0.png` and `im//0.png` are one image."""
    if not os.path.exists(path) or os.path.isdir(path):
        raise ValueError(f"CSV not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"image", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks the column(s) {', '.join(sorted(missing))} (needs a header with image, "
                             f"caption; found {reader.fieldnames})")
        rows = []
        for r in reader:
            where = f"{path} line {reader.line_num}"
            if r["image"] is None or r["caption"] is None:
                raise ValueError(f"{where}: a short row (needs image and caption): {r}")
            if not r["image"].strip():
                raise ValueError(f"{where}: empty image path")
            if not r["caption"].strip():
                raise ValueError(f"{where}: empty caption for {r['image']}")
            rows.append((r["image"], r["caption"]))
    if not rows:
        raise ValueError(f"{path} has no rows")
    base = os.path.dirname(os.path.abspath(path))
    images, index, captions, owner = [], {}, [], []
    for image, caption in rows:
        full = os.path.realpath(os.path.join(base, image))
        if full not in index:
            index[full] = len(images)
            images.append(full)
        captions.append(caption)
        owner.append(index[full])
    return images, captions, owner


@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device, batch_size=256) -> torch.Tensor:
    """(classes, D): per class, the mean of the normalised template embeddings, normalised again."""
    weights = []
    for name in classnames:
        texts = [t.format(name) for t in templates]
        emb = torch.cat([model.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float()
                         for i in range(0, len(texts), batch_size)])
        weights.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    return torch.stack(weights)


def top1_top5(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(acc1, acc5 with k capped at the class count, top-1 predictions): one topk, hits within the first k."""
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = topk == targets[:, None]
    return hit[:, 0].float().mean().item(), hit.any(1).float().mean().item(), topk[:, 0]


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (k capped at the class count) and mean per-class recall (classes present in `targets`)."""
    acc1, acc5, pred = top1_top5(logits, targets)
    recalls = [(pred[targets == c] == c).float().mean().item() for c in targets.unique().tolist()]
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": sum(recalls) / len(recalls)}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor, ks=(1, 5, 10)):
    """Recall@k both ways from normalised embeddings; `owner[j]` is the image index of caption j."""
    scores = text_emb @ image_emb.T  # (captions, images)
    positive = owner[:, None] == torch.arange(image_emb.shape[0], device=owner.device)[None, :]
    out = {}
    for k in ks:
        ki = min(k, image_emb.shape[0])
        top_images = scores.topk(ki, dim=1).indices  # per caption
        out[f"image_retrieval_recall@{k}"] = positive.gather(1, top_images).any(1).float().mean().item()
        kt = min(k, text_emb.shape[0])
        top_texts = scores.T.topk(kt, dim=1).indices  # per image
        out[f"text_retrieval_recall@{k}"] = positive.T.gather(1, top_texts).any(1).float().mean().item()
    return out
