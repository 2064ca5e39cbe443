"""`diffclip explain IMAGE --text "a dog" [--text ...] --out OUT.png`: where the image encoder looks for each text.

Writes OUT.png (the image, then one panel per text with its relevance map over the image as a colour map, bilinear
up-sampled from the patch grid) and OUT.npy (the maps, (texts, G, G) float32, each scaled to [0, 1]); see
`diffclip.explain` for the method. Everything is checked before the model loads, and both files are written under
temporary names and moved into place together (nothing half-written on failure).
"""

from __future__ import annotations

import os
import tempfile

from ..outputs import AtomicOutputs
from .common import UsageError, add_model_args, load_model, open_images

DISPLAY = 224  # side of each panel's image, in pixels


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="where the model looks for each text: relevance maps over an image (.png + "
                       ".npy)")
    p.add_argument("image", help="image file")
    p.add_argument("--text", action="append", default=[], help="a text to explain, e.g. 'a dog'; repeat for more "
                   "(one panel each)")
    p.add_argument("--out", required=True, help="output .png; the raw maps go beside it as .npy (same name)")
    p.add_argument("--layers", choices=["last", "all"], default="last",
                   help="vision blocks used: the last one (Chefer et al.'s CLIP default) or all (default: last)")
    add_model_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import numpy as np
    import torch

    from ..explain import relevance, scores

    try:
        import matplotlib  # noqa: F401  (checked before the model loads)
    except ImportError:
        raise RuntimeError("diffclip explain draws with matplotlib: pip install matplotlib") from None
    texts = [t.strip() for t in args.text]
    if not texts:
        raise UsageError("give at least one --text to explain, e.g. --text 'a dog'")
    if not all(texts):
        raise UsageError("--text is empty")
    folder, png, npy = _check_out(args.out)
    image = open_images([args.image], _loaded_rgb)[0]
    args.dtype = args.dtype or "fp32"  # gradients of a single image: fp32 unless asked otherwise
    model, preprocess, tokenizer = load_model(args)
    device = next(model.parameters()).device
    x = preprocess(image)[None].to(device).expand(len(texts), -1, -1, -1)
    tokens = tokenizer(texts).to(device)
    maps = relevance(model, x, tokens, start_layer=-1 if args.layers == "last" else 0).float().cpu()
    with torch.no_grad():
        logits = scores(model, x, tokens).cpu()
    figure = _figure(image, texts, maps, logits, args.layers)
    with AtomicOutputs(folder, [png, npy]) as out:
        figure.savefig(out.path(png), format="png", dpi=100, bbox_inches="tight")
        with open(out.path(npy), "wb") as f:
            np.save(f, maps.numpy())
    print(f"wrote {len(texts)} relevance map{'s' * (len(texts) > 1)}: {args.out} and {args.out[:-4]}.npy")
    return 0


def _check_out(out: str):
    """(folder, png name, npy name) of --out, which must be a .png path in an existing, writable folder."""
    if not out.lower().endswith(".png") or os.path.basename(out) in (".png", ""):
        raise UsageError(f"--out must be a .png file name, got {out!r}")
    folder = os.path.dirname(os.path.abspath(out))
    png = os.path.basename(out)
    npy = png[:-4] + ".npy"
    if not os.path.isdir(folder):
        raise UsageError(f"--out folder does not exist: {folder}")
    for name in (png, npy):
        if os.path.isdir(os.path.join(folder, name)):
            raise UsageError(f"--out: {os.path.join(folder, name)} is a folder")
    try:  # a real probe: os.access says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(prefix=".diffclip-explain.", suffix=".part", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out folder is not writable: {folder} ({e.strerror})") from None
    return folder, png, npy


def _loaded_rgb(img):
    """The opened image as 8-bit RGB with its pixels read (the file is closed after)."""
    from ..image import to_rgb

    rgb = to_rgb(img)
    rgb.load()
    return rgb.copy() if rgb is img else rgb


def _figure(image, texts, maps, logits, layers):
    """The image as the model sees it (its center crop, at DISPLAY pixels), then per text the map over it."""
    import numpy as np
    import torch.nn.functional as F
    from matplotlib.figure import Figure
    from torchvision import transforms

    crop = transforms.CenterCrop(DISPLAY)(transforms.Resize(DISPLAY)(image))  # the preprocess's geometry
    pixels = np.asarray(crop)
    heat = F.interpolate(maps[:, None], size=(DISPLAY, DISPLAY), mode="bilinear", align_corners=False)[:, 0]
    probs = logits.softmax(dim=0)
    n = len(texts) + 1
    fig = Figure(figsize=(2.3 * n + 0.5, 2.75))
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(pixels)
    axes[0].set_title("image", fontsize=9)
    for ax, text, h, logit, p in zip(axes[1:], texts, heat.clamp(0, 1).numpy(), logits, probs):
        ax.imshow(pixels)
        shown = ax.imshow(h, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        text = (text if len(text) <= 28 else text[:27] + "…").replace("$", r"\$")  # no mathtext
        ax.set_title(f"\"{text}\"\nlogit {logit:.1f}" + (f", p {p:.2f}" if len(texts) > 1 else ""), fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(shown, ax=list(axes), fraction=0.025, pad=0.02).set_label("relevance (per panel)", fontsize=8)
    axes[0].text(0, -0.04, f"Chefer et al. rule, {'last vision block' if layers == 'last' else 'all vision blocks'}",
                 transform=axes[0].transAxes, va="top", fontsize=7, color="0.4")
    return fig
