"""The output folder of `diffclip embed`, and reading it back.

One process writes `image_embeddings.npy` + `paths.txt` (and `text_embeddings.npy` + `texts.txt` with captions):
row i of the array is line i of the list. Under torchrun with K processes each rank r writes its shard, items
r, r+K, r+2K, ... of the sorted listing (`image_embeddings.r-of-K.npy`, likewise for texts), and rank 0 writes the
merged index: `paths.txt` / `texts.txt` with every item in order, and `index.json` naming the shards and the rule
(item i is row i // K of shard i % K). `read(folder)` gives the same (N, D) array for both layouts.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

INDEX = "index.json"
FORMAT = "diffclip-embed-shards/1"
SINGLE = {"image": ("image_embeddings.npy", "paths.txt"), "text": ("text_embeddings.npy", "texts.txt")}
_SHARD = re.compile(r"^(image|text)_embeddings\.\d+-of-\d+\.npy$")


def shard_name(kind: str, rank: int, world: int) -> str:
    return f"{kind}_embeddings.{rank}-of-{world}.npy"


def all_output_names(folder: str) -> list[str]:
    """Every file of an earlier run in `folder`, either layout (what a new run replaces or removes)."""
    names = [n for pair in SINGLE.values() for n in pair] + [INDEX]
    if os.path.isdir(folder):
        names += [n for n in os.listdir(folder) if _SHARD.match(n)]
    return names


def index(world: int, counts: dict[str, int], dim: int, normalized: bool) -> dict:
    """The index.json of a sharded run: counts = {"image": N[, "text": M]}."""
    return {
        "format": FORMAT, "world_size": world, "dim": dim, "normalized": normalized,
        "order": "item i (line i of the list file) is row i // world_size of shard i % world_size",
        **{kind: {"count": n, "list": SINGLE[kind][1],
                  "shards": [{"file": shard_name(kind, r, world), "rows": len(range(r, n, world))}
                             for r in range(world)]}
           for kind, n in counts.items()},
    }


def read(folder: str, kind: str = "image") -> tuple[np.ndarray, list[str]]:
    """(embeddings (N, D) in item order, the N paths or captions) from either layout of `diffclip embed`."""
    if kind not in SINGLE:
        raise ValueError(f"kind must be one of {tuple(SINGLE)}, got {kind!r}")
    array_name, list_name = SINGLE[kind]
    with open(os.path.join(folder, list_name), encoding="utf-8") as f:
        items = f.read().split("\n")[:-1]
    idx_path = os.path.join(folder, INDEX)
    if not os.path.exists(idx_path):
        return np.load(os.path.join(folder, array_name)), items
    with open(idx_path, encoding="utf-8") as f:
        idx = json.load(f)
    if idx.get("format") != FORMAT or kind not in idx:
        raise ValueError(f"{idx_path}: not a {FORMAT} index with {kind} embeddings")
    world, n = idx["world_size"], idx[kind]["count"]
    shards = [np.load(os.path.join(folder, s["file"])) for s in idx[kind]["shards"]]
    for r, (s, meta) in enumerate(zip(shards, idx[kind]["shards"])):
        if s.shape[0] != meta["rows"] or meta["rows"] != len(range(r, n, world)):
            raise ValueError(f"{folder}: shard {meta['file']} has {s.shape[0]} rows, the index says {meta['rows']}")
    if len(items) != n:
        raise ValueError(f"{folder}: {list_name} lists {len(items)} items, the index says {n}")
    out = np.empty((n, idx["dim"]), dtype=shards[0].dtype if shards else np.float32)
    for r, s in enumerate(shards):
        out[r::world] = s
    return out, items
