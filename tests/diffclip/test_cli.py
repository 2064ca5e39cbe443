"""The `diffclip` command line end to end on the tiny official-format checkpoint, with images the test writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from refdata import TINY_CKPT, need

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "diffclip.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray((rng.random((90, 70, 3)) * 255).astype("uint8")).save(d / "a.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(d / "b.jpg")
    (tmp_path / "broken.png").write_text("not an image")
    return tmp_path


def test_zero_shot_json(images):
    ck = need(TINY_CKPT)
    r = run("zero-shot", "imgs/a.png", "imgs/b.jpg", "--labels", "dog,cat,car", "--top-k", "2", "--json",
            "--checkpoint", ck, "--backend", "sdpa", cwd=images)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["image"] for o in out] == ["imgs/a.png", "imgs/b.jpg"]
    for o in out:
        assert len(o["top"]) == 2 and {t["label"] for t in o["top"]} <= {"dog", "cat", "car"}
        assert o["top"][0]["prob"] >= o["top"][1]["prob"] > 0


def test_embed_folder_and_captions(images):
    ck = need(TINY_CKPT)
    (images / "caps.txt").write_text("a dog\na cat\n\n")
    r = run("embed", "imgs", "--out", "out", "--text", "caps.txt", "--batch-size", "1", "--checkpoint", ck,
            cwd=images)
    assert r.returncode == 0, r.stderr
    emb = np.load(images / "out" / "image_embeddings.npy")
    assert emb.shape == (2, 64) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert (images / "out" / "paths.txt").read_text().split() == ["imgs/a.png", "imgs/b.jpg"]
    assert np.load(images / "out" / "text_embeddings.npy").shape == (2, 64)


def test_convert_to_safetensors(images):
    ck = need(TINY_CKPT)
    r = run("convert", ck, "tiny.safetensors", "--fp16", cwd=images)
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(images / "tiny.safetensors") < os.path.getsize(ck)
    r = run("zero-shot", "imgs/a.png", "--labels", "x,y", "--checkpoint", "tiny.safetensors", cwd=images)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args,words", [
    (["zero-shot", "missing.png", "--labels", "a"], "image not found"),
    (["zero-shot", "broken.png", "--labels", "a"], "cannot read image"),
    (["zero-shot", "imgs/a.png", "--labels", " , "], "--labels is empty"),
    (["embed", "nowhere", "--out", "o"], "not a folder"),
    (["convert", "nope.pt", "x.safetensors"], "checkpoint not found"),
    (["zero-shot", "imgs/a.png", "--labels", "a", "--backend", "triton"], "cannot run here"),
], ids=["missing-image", "unreadable-image", "empty-labels", "missing-dir", "missing-ckpt", "triton-on-cpu"])
def test_errors_are_one_line_without_traceback(images, args, words):
    ck = need(TINY_CKPT)
    if args[0] != "convert":
        args = args + ["--checkpoint", ck]
    r = run(*args, cwd=images)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffclip: error:") and words in lines[0], r.stderr


def test_offline_default_checkpoint_error(images):
    r = run("zero-shot", "imgs/a.png", "--labels", "a", cwd=images)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cache" in r.stderr
