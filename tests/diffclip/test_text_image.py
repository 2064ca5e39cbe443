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
