"""One training sample: image bytes or path + caption -> (pixels, token ids), or the reason it was skipped.

Shared by the CSV and webdataset sources. Decoding happens in DataLoader workers. Augmentation randomness is
seeded per sample from its position in the data stream (not from a worker's RNG history), so a sample gets the
same crop whatever the number of workers or processes, and after a resume.
"""

from __future__ import annotations

import io

import torch

from ..image import IMAGENET_MEAN, IMAGENET_STD, image_transform, to_rgb


class SampleError(Exception):
    """A corrupt or incomplete sample (skipped and counted, or fatal with --strict)."""


def train_transform(image_size: int):
    """open_clip's training augmentation: RandomResizedCrop(scale 0.9-1, bicubic), RGB, tensor, normalise (with
    the ImageNet statistics the DiffCLIP models were trained with, as in `image_transform`)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.9, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        to_rgb,
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int):
    return image_transform(image_size)


def decode_image(source):
    """A path or bytes -> PIL image, refusing decompression bombs before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
            raise SampleError(f"image claims {img.width} x {img.height} pixels, over PIL.Image.MAX_IMAGE_PIXELS")
        img.load()
        return img
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(f"undecodable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None


def sample_seed(seed: int, *stream) -> int:
    """A 63-bit seed from the run seed and a sample's stream coordinates (position, or rank/worker/counter)."""
    h = seed & 0xFFFFFFFF
    for x in stream:
        h = (h * 1_000_003 + int(x) + 1) % (2**63 - 25)  # a prime modulus: distinct coordinates, distinct seeds
    return h


class Preprocess:
    """Callable in the worker: (image source, caption) -> (pixels, ids); raises SampleError."""

    def __init__(self, transform, tokenizer, seed: int):
        self.transform, self.tokenizer, self.seed = transform, tokenizer, seed

    def __call__(self, image_source, caption, *stream):
        if caption is None or not str(caption).strip():
            raise SampleError("missing or empty caption")
        img = decode_image(image_source)
        # fork_rng: with --workers 0 this runs in the training process, whose RNG must not move.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, *stream))
            pixels = self.transform(img)
        return pixels, self.tokenizer(str(caption).strip())[0]


def collate(samples, errors, batch_meta):
    """Good samples -> a batch dict: images (n, 3, S, S), texts (n, L), the skipped count and the first few
    reasons, plus `batch_meta` (stream bookkeeping). n can be 0 when every sample was skipped."""
    if samples:
        images = torch.stack([s[0] for s in samples])
        texts = torch.stack([s[1] for s in samples])
    else:
        images, texts = None, None
    return {"images": images, "texts": texts, "skipped": len(errors), "errors": errors[:3], **batch_meta}
