"""DataLoader plumbing for the commands: an unreadable image becomes one line naming it, also from a worker process.

A DataLoader re-raises a worker's exception with the worker's whole traceback in its message, and the stream of a
webdataset raises mid-iteration; so failures are caught where they happen and travel as data (`Failed`) through
collation to the main process, which raises one UsageError. Nothing is skipped: the first failure ends the run.
"""

from __future__ import annotations

import warnings

from torch.utils.data import IterableDataset

from .common import UsageError, open_images

# What PIL and the dataset readers raise for a bad file: missing, truncated, undecodable, oversized.
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, RuntimeError, UsageError)


class Failed:
    """A failed item or batch: its one-line message."""

    def __init__(self, message: str):
        self.message = message


def check(item):
    """Raise the UsageError of a failed batch; return anything else unchanged."""
    if isinstance(item, Failed):
        raise UsageError(item.message)
    return item


def guarded_collate(collate):
    """`collate` unless the batch holds a Failed item: then that item (the first)."""
    def run(batch):
        for item in batch:
            if isinstance(item, Failed):
                return item
        return collate(batch)
    return run


def _decompression_bomb_error(e):
    from PIL import Image

    return isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning))


def _message(e, name: str) -> str:
    if isinstance(e, UsageError):
        return str(e)
    from PIL import Image

    if _decompression_bomb_error(e):
        return (f"image {name} refused: {e} (over PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; a "
                "decompression bomb?)")
    return f"cannot read image {name}: {type(e).__name__}: {e}".replace("\n", " ")


class ImagePaths:
    """Paths -> preprocessed tensors (map-style); an unreadable file gives a Failed naming it."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return open_images([self.paths[i]], self.preprocess)[0]
        except UsageError as e:
            return Failed(str(e))


class Guarded:
    """A map-style dataset (CLIP Benchmark's) whose unreadable item gives a Failed naming its file. PIL's
    decompression-bomb warning (between MAX_IMAGE_PIXELS and twice that, where PIL decodes anyway) is an error
    here, as on the --data routes."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from PIL import Image

        j = self.indices[i]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return self.dataset[j]
        except READ_ERRORS + (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            return Failed(_message(e, item_name(self.dataset, j)))


def item_name(ds, i) -> str:
    """The file behind item i of a CLIP Benchmark / torchvision dataset where it can be told, else 'item i'."""
    import os

    try:
        if hasattr(ds, "samples"):  # ImageFolder and friends
            return str(ds.samples[i][0])
        if hasattr(ds, "coco") and hasattr(ds, "ids"):  # CocoCaptions
            return os.path.join(ds.root, ds.coco.loadImgs(ds.ids[i])[0]["file_name"])
        if hasattr(ds, "fnames"):  # ImageNetV2
            return str(ds.fnames[i])
        if hasattr(ds, "ann") and hasattr(ds, "root"):  # CLIP Benchmark's Flickr
            return os.path.join(ds.root, ds.ann[i]["image"] if isinstance(ds.ann[i], dict) else str(ds.ann[i]))
    except (AttributeError, IndexError, KeyError, TypeError):
        pass
    return f"item {i} of {type(ds).__name__}"


class GuardedStream(IterableDataset):
    """An iterable (a webdataset pipeline, batched) whose failure mid-stream is yielded as a Failed and ends it."""

    def __init__(self, iterable):
        super().__init__()
        self.iterable = iterable

    def __iter__(self):
        from PIL import Image

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield from self.iterable
        except Exception as e:  # noqa: BLE001 -- reported as one line, never skipped
            yield Failed(_stream_message(e))


def _stream_message(e) -> str:
    cause = e.__cause__ or e.__context__
    if type(e).__name__ == "DecodingError":  # webdataset: the args hold the whole sample; name it instead
        return f"cannot decode {getattr(e, 'k', '?')} of sample {getattr(e, 'key', '?')} in " \
               f"{getattr(e, 'url', '?')}: {type(cause).__name__ + ': ' + str(cause) if cause else 'undecodable'}"
    return f"reading the webdataset failed: {type(e).__name__}: {e}".replace("\n", " ")
