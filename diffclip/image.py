"""Image preprocessing: the validation transform DiffCLIP was evaluated with."""

from __future__ import annotations

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(image_size: int = 224):
    """PIL image -> (3, S, S) float tensor: resize the shorter side to S, center crop S x S, RGB, ImageNet
    mean/std."""
    try:
        from torchvision import transforms
    except ImportError as e:
        raise RuntimeError("preprocessing needs torchvision: pip install 'diffclip-triton[clip]'") from e
    return transforms.Compose([
        transforms.Resize(image_size),
        transforms.CenterCrop(image_size),
        lambda img: img.convert("RGB"),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
