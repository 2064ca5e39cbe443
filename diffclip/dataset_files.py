"""Which CLIP Benchmark datasets `diffclip eval --dataset` accepts, the files each needs on disk, and a guard that
turns any network access during the build into an error.

CLIP Benchmark's builder fetches missing files whatever its `download` argument says for many datasets (wget,
gdown, kaggle, `requests.get` for ImageNetV2, curl for remote webdatasets). Without `--download` nothing may touch
the network, so the files it would fetch are checked here first, and the build runs under `no_network()` in case
a check is incomplete (a version of CLIP Benchmark that fetches something new fails loudly, it does not download).
"""

from __future__ import annotations

import contextlib
import difflib
import os

RETRIEVAL = ("mscoco_captions", "flickr30k", "flickr8k")
# torchvision datasets (or CLIP Benchmark's copies of them) that get `download=download`: with False they only
# read what is on disk and raise "Dataset not found" otherwise.
_TORCHVISION = ("cifar10", "cifar100", "food101", "sun397", "cars", "fgvc_aircraft", "dtd", "pets", "caltech101",
                "flowers", "mnist", "stl10", "eurosat", "gtsrb", "country211", "pcam", "renderedsst2", "voc2007",
                "voc2007_multilabel")
# fetched by the builder (wget, gdown, unzip into the working folder) when the root folder is missing
_FOLDER = ("imagenet_sketch", "imagenet-a", "imagenet-r", "imagenet-o", "objectnet")
CLASSIFICATION = ("imagenet1k", "imagenet1k-unverified", "imagenetv2", "babel_imagenet", "fer2013") + _FOLDER + \
    _TORCHVISION
WDS_PREFIX = "wds/"
_IMAGENETV2 = "ImageNetV2-matched-frequency"
_IMAGENETV2_SIZE = 10000  # its loader downloads the tarball when the folder holds any other number of images


class NetworkBlocked(RuntimeError):
    pass


def accepted_names() -> list[str]:
    """Every `--dataset` name the CLI accepts (plus wds/NAME for any NAME)."""
    return sorted(CLASSIFICATION + RETRIEVAL)


def default_task(name: str) -> str | None:
    """zeroshot_classification / zeroshot_retrieval for an accepted name (None for wds/: its dataset_type.txt
    says); ValueError naming the closest accepted names for anything else."""
    if name.startswith(WDS_PREFIX) and len(name) > len(WDS_PREFIX):
        return None
    if name in RETRIEVAL:
        return "zeroshot_retrieval"
    if name in CLASSIFICATION:
        return "zeroshot_classification"
    close = difflib.get_close_matches(name, accepted_names() + ["wds/NAME"], n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ValueError(f"unknown --dataset {name!r}: {hint}accepted: {', '.join(accepted_names())}, wds/NAME")


def is_url(root: str) -> bool:
    return "://" in root


def missing_files(name: str, root: str, split: str) -> list[str]:
    """What the builder would download for (name, root, split), as readable descriptions; [] when all is there."""
    j, exists = os.path.join, os.path.exists

    def need(*alternatives):  # satisfied by any one of the paths
        return [] if any(exists(p) for p in alternatives) else [" or ".join(alternatives)]

    if name.startswith(WDS_PREFIX):
        nshards = j(root, split, "nshards.txt")
        if not os.path.isfile(nshards):
            return [nshards]
        try:
            with open(nshards, encoding="utf-8") as f:
                n = int(f.read().strip())
        except ValueError:
            raise ValueError(f"{nshards} does not hold a shard count") from None
        return [p for p in (j(root, split, f"{i}.tar") for i in range(n)) if not os.path.isfile(p)]
    if not os.path.isdir(root):
        return [f"the folder {root}"]
    if name == "mscoco_captions":
        return need(j(root, "train2014" if split == "train" else "val2014")) + \
            need(j(root, f"coco_{split}_karpathy.json"))
    if name in ("flickr30k", "flickr8k"):
        return need(j(root, f"{name}_{split}_karpathy.txt"))
    if name in ("imagenet1k", "babel_imagenet"):  # torchvision's ImageNet: parsed or archived
        folder = "train" if split == "train" else "val"
        return need(j(root, "meta.bin"), j(root, "ILSVRC2012_devkit_t12.tar.gz")) + \
            need(j(root, folder), j(root, f"ILSVRC2012_img_{folder}.tar"))
    if name == "imagenet1k-unverified":
        return need(j(root, "train" if split == "train" else "val"))
    if name == "fer2013":
        return need(j(root, "train" if split == "train" else "test"))
    if name == "imagenetv2":
        tarball, folder = j(root, f"{_IMAGENETV2}.tar.gz"), j(root, _IMAGENETV2)
        if exists(tarball):
            return []
        n = sum(f.endswith(".jpeg") for _, _, files in os.walk(folder) for f in files) if exists(folder) else 0
        if n != _IMAGENETV2_SIZE:
            return [f"{tarball} or {folder}{os.sep} with its {_IMAGENETV2_SIZE} .jpeg images (found {n})"]
    return []  # _FOLDER and _TORCHVISION: the root folder is all the builder looks at before reading


@contextlib.contextmanager
def no_network(name: str):
    """Inside: opening a connection, resolving a host name or running CLIP Benchmark's download commands raises
    NetworkBlocked (a RuntimeError naming the dataset and --download). Restored on exit."""
    import socket

    def refuse(*args, **kwargs):
        raise NetworkBlocked(f"building {name} tried to reach the network (without --download nothing is "
                             "downloaded): put its files under --data-root, or pass --download")

    saved = [(socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
             (socket, "getaddrinfo")]
    try:
        from clip_benchmark.datasets import builder
        saved.append((builder, "call"))  # its wget / gdown / kaggle / unzip shell commands
    except ImportError:
        pass
    originals = [(obj, attr, getattr(obj, attr)) for obj, attr in saved]
    for obj, attr, _ in originals:
        setattr(obj, attr, refuse)
    try:
        yield
    finally:
        for obj, attr, original in originals:
            setattr(obj, attr, original)
