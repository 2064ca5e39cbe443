"""DiffCLIP against the official implementation's outputs, on every backend; architecture key manifest."""

import json

import pytest
import torch
from conftest import DEVICE
from refdata import TINY_CKPT, TINY_IO, VITB16_KEYS, need
from tolerances import MODEL_EAGER_REL, MODEL_OTHER_REL

import diffclip
from diffclip import DiffCLIP, DiffCLIPConfig


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def tiny_io():
    return torch.load(need(TINY_IO), weights_only=True)


@pytest.mark.parametrize("backend,tol", [("eager", MODEL_EAGER_REL), ("sdpa", MODEL_OTHER_REL),
                                         ("triton", MODEL_OTHER_REL)])
def test_load_and_forward_match_official(backend, tol, tiny_io):
    model, _, _ = diffclip.load(need(TINY_CKPT), attn_backend=backend, device=DEVICE)
    assert model.attn_backend == backend
    assert DiffCLIPConfig(**tiny_io["config"]) == model.config
    with torch.no_grad():
        out = model(tiny_io["inputs"]["image"].to(DEVICE), tiny_io["inputs"]["text"].to(DEVICE))
    for key, expected in tiny_io["expected"].items():
        assert rel_err(out[key].cpu(), expected) <= tol, f"{backend} {key}: rel err {rel_err(out[key].cpu(), expected)}"


def test_backends_agree_and_train(tiny_io):
    """Same embeddings and gradients on every backend (the triton one through the fused backward)."""
    model, _, _ = diffclip.load(need(TINY_CKPT), attn_backend="eager", device=DEVICE)
    image, text = tiny_io["inputs"]["image"].to(DEVICE), tiny_io["inputs"]["text"].to(DEVICE)
    grads = {}
    for backend in ("eager", "sdpa", "triton"):
        model.set_attn_backend(backend)
        model.zero_grad()
        out = model(image, text)
        (out["image_embed"].square().sum() + out["text_embed"].square().sum()).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    names = [n for n in grads["eager"] if "lambda" in n or "diff_norm" in n or "qkv_proj" in n]
    assert names
    for backend in ("sdpa", "triton"):
        assert set(grads[backend]) == set(grads["eager"])
        for n in names:
            assert rel_err(grads[backend][n], grads["eager"][n]) <= 1e-4, (backend, n)


def test_vit_b16_keys_match_official_manifest():
    with open(need(VITB16_KEYS)) as f:
        manifest = json.load(f)
    with torch.device("meta"):
        model = DiffCLIP(DiffCLIPConfig.vit_b16(), attn_backend="eager")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(manifest) == 517
    assert ours == manifest


def test_config_inferred_from_vit_b16_shapes():
    with torch.device("meta"):
        model = DiffCLIP(DiffCLIPConfig.vit_b16(), attn_backend="eager")
    assert diffclip.infer_config(model.state_dict()) == DiffCLIPConfig.vit_b16()


def test_lambda_depth_schedule():
    cfg = DiffCLIPConfig(embed_dim=16, vision_width=32, vision_img_size=32, vision_patch_size=16, vision_depth=3,
                         vision_heads=2, vocab_size=50, text_width=32, text_heads=2, text_layers=3,
                         lambda_depth_schedule=True)
    model = DiffCLIP(cfg, attn_backend="eager")
    got = [b.attn.lambda_init for b in model.visual.blocks]
    assert got == pytest.approx([0.8 - 0.6 * torch.exp(torch.tensor(-0.3 * i)).item() for i in range(3)])


def test_lambda_is_fp32_in_bf16_model():
    cfg = DiffCLIPConfig(embed_dim=16, vision_width=32, vision_img_size=32, vision_patch_size=16, vision_depth=1,
                         vision_heads=2, vocab_size=50, text_width=32, text_heads=2, text_layers=1)
    model = DiffCLIP(cfg, attn_backend="eager").to(torch.bfloat16)
    assert model.visual.blocks[0].attn.lam().dtype == torch.float32


def test_half_precision_checkpoint_loads(tmp_path, tiny_io):
    """fp16 and bf16 checkpoints (e.g. from `diffclip convert --fp16`) load into a model of the asked dtype."""
    from diffclip.checkpoint import read_state_dict, save_safetensors

    sd = read_state_dict(need(TINY_CKPT))
    for dt in (torch.float16, torch.bfloat16):
        path = str(tmp_path / f"tiny_{dt}.safetensors")
        save_safetensors(sd, path, dtype=dt)
        model, _, _ = diffclip.load(path, attn_backend="eager", dtype="fp32")
        with torch.no_grad():
            out = model(tiny_io["inputs"]["image"], tiny_io["inputs"]["text"])
        assert rel_err(out["image_embed"], tiny_io["expected"]["image_embed"]) < 2e-2
