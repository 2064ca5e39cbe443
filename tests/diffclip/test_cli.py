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
    # Works without `pip install` (the project on PYTHONPATH) and with a private, empty Hugging Face cache.
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", HF_HOME=os.path.join(str(cwd), "hf-home"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
    (["zero-shot", "imgs/a.png", "--labels", "a", "--template", "a {} photo {x}"], "exactly one {}"),
    (["zero-shot", "imgs/a.png", "--labels", "a", "--template", "a {} photo {"], "bad template"),
    (["zero-shot", "bomb.png", "--labels", "a"], "pixels"),
    (["convert", "CKPT", "no/such/folder/x.safetensors"], "destination folder does not exist"),
    (["convert", "corrupt.safetensors", "x.safetensors"], "corrupt or truncated .safetensors"),
    (["zero-shot", "imgs/a.png", "--labels", "a", "--checkpoint", "proto.pt"], "globals outside the allow-list"),
], ids=["missing-image", "unreadable-image", "empty-labels", "missing-dir", "missing-ckpt", "triton-on-cpu",
        "template-extra-field", "template-unbalanced", "decompression-bomb", "convert-missing-folder",
        "corrupt-safetensors", "unsafe-pickle"])
def test_errors_are_one_line_without_traceback(images, args, words):
    ck = need(TINY_CKPT)
    _hostile_files(images)
    args = [ck if a == "CKPT" else a for a in args]
    if args[0] != "convert" and "--checkpoint" not in args:
        args = args + ["--checkpoint", ck]
    r = run(*args, cwd=images)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffclip: error:") and words in lines[0], r.stderr


def test_offline_default_checkpoint_error(images):
    r = run("zero-shot", "imgs/a.png", "--labels", "a", cwd=images)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cache" in r.stderr


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels (no pixel data): what a decompression bomb looks like
    before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


class _CallsPrint:
    def __reduce__(self):
        return (print, ("PWNED",))


def _hostile_files(folder):
    import torch

    _png_header_only(folder / "bomb.png", 20000, 20000)
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}")
    torch.save({"state_dict": {}, "x": _CallsPrint()}, str(folder / "proto.pt"))


def test_embed_replaces_outputs_atomically_and_drops_stale_ones(images):
    ck = need(TINY_CKPT)
    (images / "caps.txt").write_text("a dog\na cat\n")
    r = run("embed", "imgs", "--out", "out", "--text", "caps.txt", "--checkpoint", ck, cwd=images)
    assert r.returncode == 0, r.stderr
    assert (images / "out" / "text_embeddings.npy").exists()
    r = run("embed", "imgs", "--out", "out", "--checkpoint", ck, cwd=images)  # no captions this time
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(images / "out")) == ["image_embeddings.npy", "paths.txt"]  # no stale text outputs


def test_embed_refuses_newline_in_file_name_and_leaves_nothing(images):
    from PIL import Image

    Image.new("RGB", (40, 40)).save(images / "imgs" / "bad\nname.png")
    r = run("embed", "imgs", "--out", "out2", "--checkpoint", need(TINY_CKPT), cwd=images)
    assert r.returncode == 2 and "line break" in r.stderr and "Traceback" not in r.stderr
    assert not (images / "out2").exists() or not os.listdir(images / "out2")


def test_embed_failure_midway_leaves_previous_outputs_intact(images):
    ck = need(TINY_CKPT)
    r = run("embed", "imgs", "--out", "out", "--checkpoint", ck, cwd=images)
    assert r.returncode == 0, r.stderr
    before = (images / "out" / "image_embeddings.npy").read_bytes()
    (images / "imgs" / "zz_broken.png").write_text("not an image")  # sorted last: fails after the first batch
    r = run("embed", "imgs", "--out", "out", "--batch-size", "1", "--checkpoint", ck, cwd=images)
    assert r.returncode == 2 and "zz_broken.png" in r.stderr
    assert (images / "out" / "image_embeddings.npy").read_bytes() == before
    assert sorted(os.listdir(images / "out")) == ["image_embeddings.npy", "paths.txt"]  # no .part files left
