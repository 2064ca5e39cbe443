"""Model inputs are validated with errors that say what was expected, instead of silent wrong answers (a 70 px
image on a 64 px model) or cryptic PyTorch errors (uint8 pixels, float or out-of-vocabulary token ids)."""

import pytest
import torch
from tiny import TINY

from diffclip import DiffCLIP



@pytest.fixture(scope="module")
def model():
    return DiffCLIP(TINY, attn_backend="eager").eval()


@pytest.mark.parametrize("image,err,match", [
    (torch.randn(1, 3, 35, 35), ValueError, r"\(B, 3, 32, 32\)"),  # a few pixels too many: cropped silently before
    (torch.randn(3, 32, 32), ValueError, r"batched.*image\[None\]"),
    (torch.randn(1, 1, 32, 32), ValueError, r"\(B, 3, 32, 32\)"),
    (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "must be float"),
    ([[0.0]], TypeError, "torch.Tensor"),
], ids=["70px-style-size", "unbatched", "grey", "uint8", "list"])
def test_bad_images(model, image, err, match):
    with pytest.raises(err, match=match):
        model.encode_image(image)


@pytest.mark.parametrize("text,err,match", [
    (torch.ones(2, 9, dtype=torch.long), ValueError, r"1 <= L <= 8"),
    (torch.ones(2, 0, dtype=torch.long), ValueError, r"1 <= L <= 8"),
    (torch.ones(8, dtype=torch.long), ValueError, r"\(B, L\)"),
    (torch.ones(2, 8), TypeError, "integer token ids"),
    (torch.full((2, 8), 50), ValueError, r"\[0, 50\).*got ids in \[50, 50\]"),
    (torch.full((2, 8), -1), ValueError, r"\[0, 50\)"),
], ids=["too-long", "empty", "unbatched", "float-ids", "out-of-vocab", "negative"])
def test_bad_token_ids(model, text, err, match):
    with pytest.raises(err, match=match):
        model.encode_text(text)


def test_valid_inputs_in_half_precision():
    for dtype in (torch.float16, torch.bfloat16):
        m = DiffCLIP(TINY, attn_backend="eager").to(dtype).eval()
        with torch.no_grad():
            out = m(torch.randn(2, 3, 32, 32), torch.randint(0, 50, (2, 5)))
        assert out["image_embed"].dtype == dtype and torch.isfinite(out["text_embed"].float()).all()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_encode_text_stops_at_the_last_end_token_exactly(backend):
    """Positions after the batch's last end token are skipped: the result must equal the full-length computation
    (causality), and padding after the end token must not matter."""
    from diffclip import model as model_mod

    torch.manual_seed(0)
    m = DiffCLIP(TINY, attn_backend=backend).eval()
    text = torch.zeros(2, 8, dtype=torch.long)
    text[0, :3] = torch.tensor([5, 7, 49])  # end token (the largest id) at position 2
    text[1, :5] = torch.tensor([3, 4, 9, 2, 49])  # at position 4
    seen = []
    real = model_mod._last_needed_position
    model_mod._last_needed_position = lambda eot, n: seen.append(real(eot, n)) or seen[-1]
    try:
        with torch.no_grad():
            short = m.encode_text(text)
            model_mod._last_needed_position = lambda eot, n: n  # force the full length
            full = m.encode_text(text)
            noisy = text.clone()
            noisy[:, 6:] = 11  # different padding after every end token
            full_noisy = m.encode_text(noisy)
    finally:
        model_mod._last_needed_position = real
    assert seen == [5]
    torch.testing.assert_close(short, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(full_noisy, full, atol=1e-6, rtol=1e-5)
