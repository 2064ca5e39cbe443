"""`diffclip.explain`: relevance maps against an independent computation, state restoration, and a tiny model trained
here that must look at the object its caption names."""

import pytest
import torch
import torch.nn.functional as F

from diffclip import DiffCLIP, DiffCLIPConfig
from diffclip.explain import relevance, text_relevance

# Three vision blocks, so that start_layer -1, 1 and 0 differ; a 4 x 4 patch grid; head dim 8 (eager runs any d).
CFG = DiffCLIPConfig(embed_dim=16, vision_width=32, vision_img_size=32, vision_patch_size=8, vision_depth=3,
                     vision_heads=4, vocab_size=50, context_length=8, text_width=32, text_heads=2, text_layers=2)
TOKENS = torch.tensor([[48, 3, 4, 49, 0, 0, 0, 0], [48, 5, 49, 0, 0, 0, 0, 0]])


@pytest.fixture
def model():
    torch.manual_seed(0)
    return DiffCLIP(CFG, attn_backend="sdpa").eval()


def images(b=2, seed=1):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def independent_relevance(model, x, tokens, start):
    """The vision tower written out again from the blocks' projections (not through the attention backends or
    kernels.diff_attn_reference), each differential map A = P1 − λ·P2 kept, gradients by autograd, Chefer's rule."""
    vt, (b, w) = model.visual, (x.shape[0], CFG.vision_width)
    h = vt.patch_embed(x)
    h = torch.cat([vt.cls_token.expand(b, -1, -1), h], dim=1) + vt.pos_embed
    n, maps = h.shape[1], []
    for blk in vt.blocks:
        at, y = blk.attn, blk.norm1(h)
        heads, d = at.heads, at.head_dim
        # the official q/k/v projections (the packed qkv_proj holds them as its three row blocks)
        (wq, wk, wv), (bq, bk, bv) = at.qkv_proj.weight.chunk(3), at.qkv_proj.bias.chunk(3)
        q = F.linear(y, wq, bq).view(b, n, heads, d).transpose(1, 2)
        k = F.linear(y, wk, bk).view(b, n, heads, d).transpose(1, 2)
        v = F.linear(y, wv, bv).view(b, n, heads // 2, 2 * d).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
        lam = torch.exp((at.lambda_q1 * at.lambda_k1).sum()) - torch.exp((at.lambda_q2 * at.lambda_k2).sum())
        a = p[:, 0::2] - (lam + at.lambda_init) * p[:, 1::2]
        maps.append(a)
        o = a @ v
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + at.diff_norm.eps) * at.diff_norm.weight
        o = o * (1 - at.lambda_init)
        h = h + at.out_proj(o.transpose(1, 2).reshape(b, n, w))
        h = h + blk.mlp(blk.norm2(h))
    img = vt.norm(h)[:, 0] @ model.image_projection
    assert torch.allclose(img, model.encode_image(x), atol=1e-5)  # the rewrite is the model
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    score = model.logit_scale.exp() * (F.normalize(img, dim=-1) * txt).sum(-1)
    grads = torch.autograd.grad(score.sum(), maps[start:])
    r = torch.eye(n).expand(b, n, n)
    for a, g in zip(maps[start:], grads):
        r = r + (g * a).clamp(min=0).mean(dim=1) @ r
    r = r[:, 0, 1:].reshape(b, 4, 4)
    lo, hi = r.amin(dim=(1, 2), keepdim=True), r.amax(dim=(1, 2), keepdim=True)
    return (r - lo) / (hi - lo)


@pytest.mark.parametrize("start", [-1, 0, 1])
def test_relevance_matches_an_independent_computation(model, start):
    x = images()
    got = relevance(model, x, TOKENS, start_layer=start)
    want = independent_relevance(model, x, TOKENS, start)
    assert got.shape == (2, 4, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got.amin(dim=(1, 2)).eq(0).all() and got.amax(dim=(1, 2)).eq(1).all()


def test_start_layers_differ_and_batch_of_one_is_its_row(model):
    x = images()
    last, every = relevance(model, x, TOKENS), relevance(model, x, TOKENS, start_layer=0)
    assert not torch.allclose(last, every, atol=1e-3)
    torch.testing.assert_close(relevance(model, x[1:], TOKENS[1:], start_layer=0), every[1:], atol=1e-5, rtol=0)


def test_restores_backend_mode_and_flags_and_leaves_no_grad(model):
    model.train()
    model.visual.blocks[0].attn.backend = "eager"  # a per-layer choice survives too
    model.token_embedding.weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    x = images()
    with torch.no_grad():  # works whatever the caller's grad mode, and leaves it alone
        r = relevance(model, x, TOKENS, start_layer=0)
        assert not torch.is_grad_enabled()
    assert model.attn_backend == "sdpa" and model.training and all(m.training for m in model.modules())
    assert [m.attn.backend for m in model.visual.blocks] == ["eager", "sdpa", "sdpa"]
    assert all(m.attn.attn_hook is None for m in model.visual.blocks)
    assert [p.requires_grad for p in model.parameters()] == before
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(relevance(model.eval(), x, TOKENS, start_layer=0), r)  # same maps in train mode


def test_restores_state_when_the_forward_raises(model):
    model.requires_grad_(False)

    def fail(*_):
        assert model.visual.blocks[-1].attn.backend == "eager"
        raise RuntimeError("boom")

    handle = model.visual.blocks[-1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            relevance(model, images(), TOKENS)
    finally:
        handle.remove()
    assert model.attn_backend == "sdpa" and not model.training
    assert all(m.attn.backend == "sdpa" and m.attn.attn_hook is None for m in model.visual.blocks)
    assert not any(p.requires_grad for p in model.parameters())


def test_bad_arguments(model):
    x = images()
    for bad in (3, -4):
        with pytest.raises(ValueError, match=r"start_layer.*\[-3, 2\]"):
            relevance(model, x, TOKENS, start_layer=bad)
    with pytest.raises(TypeError, match="start_layer"):
        relevance(model, x, TOKENS, start_layer=0.0)
    with pytest.raises(ValueError, match="2 images and 1 texts"):
        relevance(model, x, TOKENS[:1])
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        relevance(model, x[:, :, :16], TOKENS)
    assert model.attn_backend == "sdpa"


def test_attention_hook_needs_the_eager_backend(model):
    model.visual.blocks[0].attn.attn_hook = lambda a: None
    with pytest.raises(RuntimeError, match="needs the eager backend"):
        model.encode_image(images())


def test_text_relevance_rows(model):
    r = text_relevance(model, images(), TOKENS, start_layer=0)
    assert r.shape == (2, 8)
    assert r[0, 4:].eq(0).all() and r[1, 3:].eq(0).all()  # nothing after the end token
    assert r[0, 1:3].max() == 1 and r[1, 1] == 1  # the most relevant word is 1
    assert (r >= 0).all() and r[0, 3] >= 1 and r[1, 2] >= 1  # the end token keeps R's identity term


# --- a tiny model trained here on "an object of one colour on a grey background", captions naming the colour ---

COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])  # red, green, blue, yellow
TRAIN_CFG = DiffCLIPConfig(embed_dim=16, vision_width=32, vision_img_size=32, vision_patch_size=8, vision_depth=2,
                           vision_heads=4, vocab_size=8, context_length=4, text_width=32, text_heads=2, text_layers=1,
                           lambda_init=0.2)


def colour_images(n, gen):
    """A square of 1 x 1 or 2 x 2 patches in one of the colours, at a random place on the 4 x 4 patch grid, on grey;
    with pixel noise. Returns normalised images, the colour index and the object's patch mask."""
    colour = torch.randint(0, 4, (n,), generator=gen)
    img, mask = torch.full((n, 3, 32, 32), 0.5), torch.zeros(n, 4, 4, dtype=torch.bool)
    for i in range(n):
        s = int(torch.randint(1, 3, (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(0, 5 - s, (2,), generator=gen))
        img[i, :, 8 * r:8 * (r + s), 8 * c:8 * (c + s)] = COLOURS[colour[i]][:, None, None]
        mask[i, r:r + s, c:c + s] = True
    img = img + 0.05 * torch.randn(img.shape, generator=gen)
    return (img - 0.5) / 0.5, colour, mask


def captions(colour):
    """[start, colour word, end] token ids: the caption names the colour."""
    t = torch.zeros(len(colour), 4, dtype=torch.long)
    t[:, 0], t[:, 1], t[:, 2] = 6, colour + 1, 7
    return t


def trained_model(steps, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DiffCLIP(TRAIN_CFG, attn_backend="sdpa")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    every = captions(torch.arange(4))
    for _ in range(steps):  # zero-shot classification loss against the four captions
        x, colour, _ = colour_images(32, gen)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(every), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.T, colour)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), gen


def inside_minus_outside(model, x, colour, mask):
    r = relevance(model, x, captions(colour), start_layer=0)
    inside = (r * mask).sum((1, 2)) / mask.sum((1, 2))
    outside = (r * ~mask).sum((1, 2)) / (~mask).sum((1, 2))
    return inside - outside


def test_trained_tiny_model_looks_at_the_object_its_caption_names():
    """Pooled over three independently trained models: how sharply one small model's maps isolate the object
    varies a lot from seed to seed (measured, 60 steps, seeds 0/1/2: matching-caption margin 0.33/0.57/0.64,
    inside > outside on 58/92/84 % of the images), so no single seed is a fair test of the method."""
    match, wrong = [], []
    for seed in (0, 1, 2):
        model, gen = trained_model(steps=60, seed=seed)
        x, colour, mask = colour_images(64, gen)
        with torch.no_grad():
            every = F.normalize(model.encode_text(captions(torch.arange(4))), dim=-1)
            accuracy = (F.normalize(model.encode_image(x), dim=-1) @ every.T).argmax(1).eq(colour).float().mean()
        assert accuracy > 0.95, (seed, accuracy)  # it learnt the task
        match.append(inside_minus_outside(model, x, colour, mask))
        wrong.append(sum(inside_minus_outside(model, x, (colour + k) % 4, mask) for k in (1, 2, 3)) / 3)
    match, wrong = torch.cat(match), torch.cat(wrong)
    # Measured (CPU): pooled margin 0.51, inside > outside on 78 % of the images; wrong captions 0.44. (The object
    # is salient whatever the caption, so the map for a wrong caption is high too: only a small gap is asserted.)
    assert match.mean() > 0.3, match.mean()
    assert match.gt(0).float().mean() > 0.7
    assert match.mean() > wrong.mean(), (match.mean(), wrong.mean())


# --- the command line ---


def cli(*args, cwd):
    """`python -m diffclip.cli ...` in a subprocess: the project on PYTHONPATH, an empty private hub cache."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", HF_HOME=str(cwd / "hf-home"),
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "diffclip.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


@pytest.fixture
def photo(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((90, 70, 3)) * 255).astype("uint8")).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_text("not an image")
    return tmp_path


def test_cli_writes_the_figure_and_the_maps_of_relevance(photo):
    import numpy as np
    from PIL import Image
    from refdata import TINY_CKPT, need

    import diffclip

    ck = need(TINY_CKPT)
    r = cli("explain", "photo.png", "--text", "a dog", "--text", "a cat", "--out", "maps.png", "--layers", "all",
            "--checkpoint", ck, cwd=photo)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in photo.iterdir() if p.name.startswith(("maps", "."))) == ["maps.npy", "maps.png"]
    with Image.open(photo / "maps.png") as im:
        assert im.format == "PNG" and im.width > 2 * im.height  # the image and two panels side by side
    maps = np.load(photo / "maps.npy")
    assert maps.shape == (2, 4, 4) and maps.dtype == np.float32  # the tiny checkpoint: 64 px, patch 16
    model, preprocess, tokenizer = diffclip.load(ck)  # the same maps through the API
    with Image.open(photo / "photo.png") as im:
        x = preprocess(im)[None].expand(2, -1, -1, -1)
    want = relevance(model, x, tokenizer(["a dog", "a cat"]), start_layer=0)
    np.testing.assert_allclose(maps, want.numpy(), atol=1e-5)


def test_cli_error_is_one_line_under_python_m(photo):
    r = cli("explain", "photo.png", "--out", "maps.png", cwd=photo)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "at least one --text" in lines[0], r.stderr


@pytest.mark.parametrize("args,words", [
    (["photo.png", "--text", " ", "--out", "m.png"], "--text is empty"),
    (["photo.png", "--text", "a", "--out", "m.jpg"], "must be a .png"),
    (["photo.png", "--text", "a", "--out", "nowhere/m.png"], "folder does not exist"),
    (["photo.png", "--text", "a", "--out", "/proc/m.png"], "not writable"),
    (["photo.png", "--text", "a", "--out", "adir.png"], "is a folder"),
    (["missing.png", "--text", "a", "--out", "m.png"], "image not found"),
    (["broken.png", "--text", "a", "--out", "m.png"], "cannot read image"),
    (["photo.png", "--text", "a", "--out", "m.png", "--checkpoint", "nope.pt"], "checkpoint not found"),
], ids=["empty-text", "not-png", "missing-folder", "unwritable-folder", "out-is-folder", "missing-image",
        "unreadable-image", "missing-checkpoint"])
def test_cli_errors_are_one_line_and_leave_earlier_outputs_alone(photo, args, words, capsys, monkeypatch):
    from diffclip.cli import main

    (photo / "adir.png").mkdir()
    (photo / "m.png").write_bytes(b"earlier run")
    monkeypatch.chdir(photo)
    assert main(["explain", *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffclip: error:") and words in lines[0], lines
    assert (photo / "m.png").read_bytes() == b"earlier run"
    assert sorted(p.name for p in photo.iterdir()) == ["adir.png", "broken.png", "m.png", "photo.png"]
