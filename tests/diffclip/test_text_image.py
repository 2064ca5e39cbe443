"""Tokenizer (open_clip's CLIP BPE) and the validation image transform."""

import pytest
import torch

from diffclip import get_tokenizer, image_transform


def test_clip_tokenizer_format():
    tok = get_tokenizer()
    ids = tok(["a photo of a dog", "cat"])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert (ids[:, 0] == 49406).all()
    for row in ids:
        end = int((row == 49407).nonzero()[0])
        assert row.argmax() == end and (row[end + 1:] == 0).all()


def test_long_text_is_truncated_keeping_end_token():
    ids = get_tokenizer()(" ".join(["word"] * 200))
    assert ids.shape == (1, 77) and ids[0, -1] == 49407


def test_small_vocab_folds_with_warning():
    with pytest.warns(UserWarning, match="vocabulary"):
        tok = get_tokenizer(77, 1000)
    ids = tok(["a dog", "a photo of a cat"])
    assert ids.max() < 1000 and (ids[:, 0] == 998).all() and (ids.argmax(-1) == (ids == 999).int().argmax(-1)).all()


def test_image_transform_resizes_shorter_side_and_crops():
    from PIL import Image

    img = Image.new("RGBA", (300, 450), (255, 0, 0, 255))
    x = image_transform(224)(img)
    assert x.shape == (3, 224, 224)
    # pure red after ImageNet normalisation
    torch.testing.assert_close(x[:, 100, 100], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_image_transform_keeps_aspect_ratio():
    """A tall image: top, middle and bottom thirds red, blue, green. Resizing the shorter side and cropping the
    centre keeps rows 60 and 160 (of 224) in the blue middle; a squashing resize would put row 160 in the green."""
    from PIL import Image

    img = Image.new("RGB", (300, 450))
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        img.paste(colour, (0, 150 * i, 300, 150 * (i + 1)))
    x = image_transform(224)(img)
    blue = torch.tensor([-0.485 / 0.229, -0.456 / 0.224, (1 - 0.406) / 0.225])
    for row in (60, 160):
        torch.testing.assert_close(x[:, row, 112], blue, atol=1e-3, rtol=0)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_keep_their_range(mode):
    """A mid-grey 16-bit (or [0, 1] float) image must come out mid-grey, not clipped to white."""
    import numpy as np
    from PIL import Image

    if mode == "F":
        img = Image.fromarray(np.full((64, 64), 0.5, dtype=np.float32), mode="F")
    else:
        img = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16 if mode == "I;16" else np.int32))
        img = img.convert(mode) if img.mode != mode else img
    assert img.mode == mode
    x = image_transform(32)(img)
    grey = torch.tensor([(128 / 255 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    torch.testing.assert_close(x[:, 16, 16], grey, atol=0.02, rtol=0)
