"""Image preprocessing: the validation transform DiffCLIP was evaluated with."""

from __future__ import annotations

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # files read as images
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB with the image's range preserved.

    `convert("RGB")` clips 16- and 32-bit integer images (I;16*, I) at 255, turning most of a 16-bit photo white,
    and clips float (F) images the same way. Those are rescaled instead: 16-bit data (and I images whose values fit
    in 16 bits) by 255/65535, F images with values in [0, 1] by 255; anything else by its own maximum. Palette,
    grey, alpha and CMYK modes go through PIL's conversion (alpha is dropped)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        import numpy as np

        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.min() >= 0 and a.max() <= 65535):
            scale = 255.0 / 65535.0
        elif img.mode == "F" and a.min() >= 0 and a.max() <= 1:
            scale = 255.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a, scale = a - lo, (255.0 / (hi - lo) if hi > lo else 0.0)
        grey = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return img.convert("RGB")


def image_transform(image_size: int = 224):
    """PIL image -> (3, S, S) float tensor: 8-bit RGB (range-preserving for 16-bit and float images), resize the
    shorter side to S, center crop S x S, ImageNet mean/std."""
    try:
        from torchvision import transforms
    except ImportError as e:
        raise RuntimeError("preprocessing needs torchvision: pip install 'diffclip-triton[clip]'") from e
    return transforms.Compose([
        to_rgb,
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
