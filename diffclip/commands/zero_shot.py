"""`diffclip zero-shot IMAGE... --labels a,b,c`: classify images against text labels."""

from __future__ import annotations

import json
import os

from . import loaders
from .common import UsageError, add_model_args, check_template, default_workers, load_model


def add_parser(sub) -> None:
    zs = sub.add_parser("zero-shot", help="classify images against text labels")
    zs.add_argument("images", nargs="+", help="image files")
    zs.add_argument("--labels", required=True, help="comma-separated class names, e.g. 'dog,cat,car'")
    zs.add_argument("--template", default="a photo of a {}", help="prompt template with one {} (default: %(default)s)")
    zs.add_argument("--top-k", type=int, default=5, help="labels to show per image (default 5)")
    zs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    zs.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    zs.add_argument("--num-workers", type=int, default=default_workers(),
                    help="image-decoding worker processes (default: %(default)s)")
    add_model_args(zs)
    zs.set_defaults(run=run)


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader, default_collate
    from tqdm import tqdm

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        raise UsageError("--labels is empty: give comma-separated class names")
    check_template(args.template)
    if args.top_k < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--top-k and --batch-size must be >= 1, --num-workers >= 0")
    for p in args.images:
        if not os.path.isfile(p):
            raise UsageError(f"image not found: {p}")
    model, preprocess, tokenizer = load_model(args)
    device = next(model.parameters()).device
    text = tokenizer([args.template.format(c) for c in labels]).to(device)
    loader = DataLoader(loaders.ImagePaths(args.images, preprocess), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=loaders.guarded_collate(default_collate))
    probs = []
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(text).float(), dim=-1)
        for batch in tqdm(loader, desc="images", unit="batch", disable=None):  # a bar on a terminal only
            img = torch.nn.functional.normalize(model.encode_image(loaders.check(batch).to(device)).float(), dim=-1)
            probs.append((model.logit_scale.exp().float() * img @ txt.T).softmax(dim=-1))
    probs = torch.cat(probs)
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
