"""Synthetic training data for the `diffclip train` tests: a learnable image/caption set (one colour word per
solid-colour image) written as a CSV with image files, or as img2dataset-style tar shards, and a tiny config."""

import io
import json
import os
import tarfile

import numpy as np

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20),
           "black": (5, 5, 5), "white": (250, 250, 250), "orange": (250, 140, 0), "purple": (130, 20, 160),
           "pink": (250, 150, 200), "brown": (120, 70, 20), "gray": (128, 128, 128), "cyan": (20, 220, 220),
           "navy": (10, 10, 90), "olive": (110, 110, 10), "teal": (10, 110, 110), "maroon": (110, 10, 10)}

# Real CLIP vocabulary (no id folding), everything else as small as the kernels allow (head dim 16).
TINY_TRAIN = dict(embed_dim=16, vision_width=32, vision_img_size=32, vision_patch_size=16, vision_depth=1,
                  vision_heads=2, context_length=8, vocab_size=49408, text_width=32, text_heads=2, text_layers=1)


def write_config(folder) -> str:
    path = os.path.join(str(folder), "tiny.json")
    with open(path, "w") as f:
        json.dump(TINY_TRAIN, f)
    return path


def png_bytes(rgb, seed, size=40) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.clip(np.array(rgb)[None, None] + rng.integers(-8, 9, (size, size, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def samples(n=16):
    names = list(COLOURS)
    return [(png_bytes(COLOURS[names[i % len(names)]], i), f"{names[i % len(names)]}") for i in range(n)]


def write_csv(folder, n=16, extra_rows=()) -> str:
    """folder/train.csv (image, caption) + folder/img/*.png; extra_rows: (relative image path, caption) rows
    appended as given (for corrupt samples)."""
    folder = str(folder)
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    lines = ["image,caption"]
    for i, (png, caption) in enumerate(samples(n)):
        with open(os.path.join(folder, "img", f"{i:03d}.png"), "wb") as f:
            f.write(png)
        lines.append(f"img/{i:03d}.png,{caption}")
    lines += [f"{p},{c}" for p, c in extra_rows]
    path = os.path.join(folder, "train.csv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_shards(folder, n=16, shards=2, extra=()) -> list[str]:
    """img2dataset layout: NNNNN.tar with KEY.png + KEY.txt + KEY.json, and NNNNN_stats.json; `extra`: (key,
    {ext: bytes}) members added to the first shard (for corrupt samples)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    data = samples(n)
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        mine = [(i, d) for i, d in enumerate(data) if i % shards == s]
        with tarfile.open(path, "w") as tar:
            def add(name, payload):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

            for i, (png, caption) in mine:
                key = f"{s:05d}{i:04d}"
                add(f"{key}.png", png)
                add(f"{key}.txt", caption.encode())
                add(f"{key}.json", json.dumps({"caption": caption}).encode())
            if s == 0:
                for key, files in extra:
                    for ext, payload in files.items():
                        add(f"{key}.{ext}", payload)
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"successes": len(mine)}, f)
        paths.append(path)
    return paths
