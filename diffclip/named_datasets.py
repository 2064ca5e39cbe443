"""LAION's CLIP Benchmark datasets by name: `diffclip eval zeroshot|retrieval --dataset NAME --data-root DIR`.

The DiffCLIP paper's numbers were measured with CLIP Benchmark, so this route uses its dataset builder, its class
names and prompt templates, its collate functions and its metric code; what it lacks, and what is written here,
is sharding over torchrun processes (its `evaluate` functions run one process) and a model adapter. Optional
dependency: ``pip install -e ".[eval]"``.

Differences from `clip_benchmark eval`, all deliberate:
- The model runs in its own dtype (bf16 on CUDA by default) instead of fp32 weights under fp16 autocast; text
  and image embeddings are normalised and compared in fp32.
- Recall@k uses k = 1, 5, 10 (its command line defaults to 5), capped at the number of candidates.
- Nothing is downloaded unless `download=True`: its builder fetches missing files (wget, gdown, kaggle, requests)
  for some datasets whatever `download` says, and ends the process when a downloader is missing, so the files it
  would fetch are checked first (a missing one is an error naming it) and the build runs with the network
  blocked (diffclip/dataset_files.py). Only the names in `dataset_files.accepted_names()` and wds/NAME are
  accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch

from . import dataset_files

INSTALL = "pip install -e \".[eval]\" (LAION's CLIP Benchmark; or pip install clip-benchmark)"
TASKS = ("zeroshot_classification", "zeroshot_retrieval")
RECALL_K = (1, 5, 10)


def _builder():
    try:
        from clip_benchmark.datasets import builder
    except ImportError as e:
        if (getattr(e, "name", None) or "clip_benchmark").split(".")[0] == "clip_benchmark":
            raise RuntimeError(f"--dataset needs LAION's CLIP Benchmark, which is not installed: {INSTALL}") from e
        # e.g. its ImageNetV2 loader imports `requests` without declaring it (our [eval] extra adds it)
        raise RuntimeError(f"CLIP Benchmark is installed but cannot be imported ({e}): {INSTALL}") from e
    return builder


def _wds_type(root: str) -> str:
    path = os.path.join(root, "dataset_type.txt")
    if not os.path.isfile(path):
        return "classification"  # the builder's default too
    with open(path, encoding="utf-8") as f:
        return f.read().strip().lower()


@dataclasses.dataclass
class NamedDataset:
    name: str
    task: str
    dataset: Any
    classnames: list | None  # zero-shot classification: CLIP Benchmark's class names
    templates: Any  # its templates: a list with "{c}", or {class name: [prompts]}
    collate_fn: Any
    iterable: bool  # a webdataset stream (no random access, no length)
    root: str = ""
    split: str = ""


def check(name: str, root: str, split: str, task: str, download: bool = False):
    """What can be checked before anything is read: the name accepted (ValueError naming the closest ones), CLIP
    Benchmark importable (RuntimeError), the dataset's task matching `task` and, without `download`, the files its
    builder would fetch present and the root not a URL (ValueError)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    default = dataset_files.default_task(name)  # before the import: a typo is named even without CLIP Benchmark
    builder = _builder()
    other = {"zeroshot_classification": "retrieval", "zeroshot_retrieval": "zeroshot"}[task]
    remote = dataset_files.is_url(root)
    if remote and not download:
        raise ValueError(f"--data-root {root} is a URL: streaming {name} from it downloads; pass --download")
    if default is None and not remote:
        kind = _wds_type(root)
        if (kind == "retrieval") != (task == "zeroshot_retrieval"):
            raise ValueError(f"{name} at {root} is a {kind} dataset (dataset_type.txt): use `diffclip eval {other}`")
    elif default is not None and default != task:
        raise ValueError(f"{name} is a {default} dataset in CLIP Benchmark: use `diffclip eval {other}`")
    if not download and not remote:
        missing = dataset_files.missing_files(name, root, split)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"{name} (split {split}) is not in {root}: missing {missing[0]}{more}; put the files "
                             f"there, or pass --download to let CLIP Benchmark fetch them")
    return builder


class DeferredTransform:
    """The image transform handed to the builder before the model (and so its preprocessing) is loaded: the
    dataset is built, and its mistakes reported, first; `set` supplies the real transform before any image is
    read."""

    def __init__(self):
        self.fn = None

    def set(self, fn):
        self.fn = fn

    def __call__(self, img):
        if self.fn is None:
            raise RuntimeError("DeferredTransform used before set()")
        return self.fn(img)


def build(name: str, root: str, split: str, task: str, transform, download: bool = False) -> NamedDataset:
    """The dataset as CLIP Benchmark builds it (after `check`). ValueError for a user's mistake (unknown name,
    wrong task, missing files, bad split); RuntimeError when CLIP Benchmark is not installed or, without
    `download`, when building tried to reach the network."""
    builder = check(name, root, split, task, download)
    guard = contextlib.nullcontext() if download else dataset_files.no_network(name)
    try:
        with guard:
            ds = builder.build_dataset(name, root=root, transform=transform, split=split, download=download,
                                       task=task)
    except SystemExit as e:  # the builder exits when a downloader (gdown, kaggle) is missing
        raise RuntimeError(f"CLIP Benchmark gave up building {name} (exit {e.code}); see its message above") from None
    except dataset_files.NetworkBlocked:
        raise
    except (AssertionError, ValueError, RuntimeError, OSError, ImportError) as e:
        hint = " (pass --download to let it fetch the files)" if "download=True" in str(e) else ""
        raise ValueError(f"CLIP Benchmark cannot build {name} (split {split}) from {root}: {e}{hint}") from None
    iterable = not hasattr(ds, "__len__")
    classnames = templates = None
    if task == "zeroshot_classification":
        classnames, templates = list(ds.classes), ds.templates
    collate = None if iterable else builder.get_dataset_collate_fn(name)
    return NamedDataset(name, task, ds, classnames, templates, collate, iterable, root, split)


class FloatOutputs(torch.nn.Module):
    """The model as CLIP Benchmark's metric code expects it (`encode_text`/`encode_image`), with fp32 outputs so
    that its normalise-and-average runs in fp32 whatever the model's dtype."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_text(self, text):
        return self.model.encode_text(text).float()

    def encode_image(self, image):
        return self.model.encode_image(image).float()


def class_embeddings(model, tokenizer, classnames, templates, device) -> torch.Tensor:
    """(len(classnames), D): CLIP Benchmark's zero-shot classifier for these classes (its template formatting, its
    per-class mean of normalised prompt embeddings, normalised again)."""
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    from clip_benchmark.metrics import zeroshot_classification as zs

    guard = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    progress, zs.tqdm = zs.tqdm, lambda it, *a, **k: it  # its own bar per class: one bar (the images') per run
    try:
        with guard:  # its code moves tokens with .to(device.type): make our device the current one
            weights = zero_shot_classifier(FloatOutputs(model), tokenizer, classnames, templates, device.type,
                                           amp=False)
    finally:
        zs.tqdm = progress
    return weights.T.float()


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, n_classes: int) -> dict[str, float]:
    """CLIP Benchmark's metrics for (N, C) logits: acc1, acc5 (k capped at the class count, as on the --data
    route; CLIP Benchmark reports NaN, which is not valid JSON),
    mean_per_class_recall (sklearn's balanced accuracy, as it uses); mean_average_precision (its own function) for
    multi-label targets. Top-k accuracy comes from `diffclip.evaluate` (one topk, hits within the first k: what its
    `accuracy` computes; that function calls float() on a one-element array, which NumPy >= 2.4 rejects)."""
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class
    from sklearn.metrics import balanced_accuracy_score

    from .evaluate import top1_top5

    logits, targets = logits.float().cpu(), targets.cpu()
    if targets.dim() == 2:
        return {"mean_average_precision": average_precision_per_class(logits, targets).mean().item()}
    acc1, acc5, _ = top1_top5(logits, targets)
    pred = logits.argmax(dim=1)  # as it predicts (argmax, not topk, breaks exact ties)
    return {"acc1": acc1, "acc5": acc5,
            "mean_per_class_recall": float(balanced_accuracy_score(targets.numpy(), pred.numpy()))}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor,
                      batch_size: int, ks=RECALL_K) -> dict[str, float]:
    """CLIP Benchmark's recall@k both ways (its `recall_at_k`, > 0 per query, averaged), k capped at the
    candidate count. Embeddings L2-normalised; `owner[j]` is the image index of caption j."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    image_emb, text_emb, owner = image_emb.float().cpu(), text_emb.float().cpu(), owner.cpu()
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owner] = True
    out = {}
    for k in ks:
        ki, kt = min(k, scores.shape[1]), min(k, scores.shape[0])
        hits_i = batchify(recall_at_k, scores, positive, batch_size, "cpu", k=ki) > 0
        hits_t = batchify(recall_at_k, scores.T, positive.T, batch_size, "cpu", k=kt) > 0
        out[f"image_retrieval_recall@{k}"] = hits_i.float().mean().item()
        out[f"text_retrieval_recall@{k}"] = hits_t.float().mean().item()
    return out

