"""torch.compile(fullgraph=True) over both encoders with every attention backend: the backend choice and the λ
computation must not break the graph (aot_eager on CPU; Inductor on CUDA)."""

import dataclasses

import pytest
import torch
from conftest import DEVICE
from tiny import TINY as TINY1

from diffclip import DiffCLIP

TINY = dataclasses.replace(TINY1, vision_depth=2, text_layers=2)  # two layers per encoder
BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


@pytest.mark.parametrize("backend", ["eager", "sdpa", "triton"])
def test_encoders_compile_fullgraph(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DiffCLIP(TINY, attn_backend=backend).to(DEVICE).eval()
    image = torch.randn(2, 3, 32, 32, device=DEVICE)
    text = torch.randint(1, 50, (2, 8), device=DEVICE)
    with torch.no_grad():
        want_img, want_txt = model.encode_image(image), model.encode_text(text)
        got_img = torch.compile(model.encode_image, fullgraph=True, backend=BACKEND)(image)
        got_txt = torch.compile(model.encode_text, fullgraph=True, backend=BACKEND)(text)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_txt, want_txt, atol=1e-5, rtol=1e-5)


def test_training_step_compiles_fullgraph_with_triton():
    pytest.importorskip("triton")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DiffCLIP(TINY, attn_backend="triton").to(DEVICE)
    image = torch.randn(2, 3, 32, 32, device=DEVICE)
    loss = torch.compile(lambda x: model.encode_image(x).square().mean(), fullgraph=True, backend=BACKEND)(image)
    loss.backward()
    lam_param = model.visual.blocks[0].attn.lambda_q1
    assert lam_param.grad is not None and torch.isfinite(lam_param.grad).all()
