"""Inputs of `diffclip eval` as users write them: CSV from spreadsheets (byte-order mark), aliases of one image,
short rows and empty captions, templates from a pipe, class folders read by torchvision's ImageFolder rules; and
the JSON is valid (no NaN) with acc5 capped the same way on both routes."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from refdata import TINY_CKPT, need

from diffclip import evaluate
from diffclip.cli import main


def _png(path, seed=0, fmt=None):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).save(path, format=fmt)


def _run(args, out):
    assert main(args + ["--json", str(out), "--checkpoint", need(TINY_CKPT), "--backend", "eager",
                        "--num-workers", "0"]) == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    return json.loads(text)


def _images(tmp_path, n=3):
    (tmp_path / "im").mkdir()
    for j in range(n):
        _png(tmp_path / "im" / f"{j}.png", j)


def test_path_aliases_of_one_image_are_one_image(tmp_path):
    _images(tmp_path)
    plain = [("im/0.png", "a dog"), ("im/1.png", "a cat"), ("im/0.png", "a brown dog"), ("im/2.png", "a car")]
    aliased = [("im/0.png", "a dog"), ("im/1.png", "a cat"), ("./im/0.png", "a brown dog"), ("im//2.png", "a car")]
    for name, rows in (("plain.csv", plain), ("aliased.csv", aliased)):
        (tmp_path / name).write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    images, _, owner = evaluate.caption_csv(str(tmp_path / "aliased.csv"))
    assert len(images) == 3 and owner == [0, 1, 0, 2]
    a = _run(["eval", "retrieval", "--data", str(tmp_path / "plain.csv")], tmp_path / "a.json")["metrics"]
    b = _run(["eval", "retrieval", "--data", str(tmp_path / "aliased.csv")], tmp_path / "b.json")["metrics"]
    assert a == b


def test_csv_with_a_byte_order_mark_reads(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "bom.csv").write_bytes("image,caption\nim/0.png,a dog\nim/1.png,a cat\n".encode("utf-8-sig"))
    assert evaluate.caption_csv(str(tmp_path / "bom.csv"))[1] == ["a dog", "a cat"]


@pytest.mark.parametrize("body,words", [("im/0.png,a dog\nim/1.png\n", "line 3: a short row"),
                                        ("im/0.png,a dog\nim/1.png,  \n", "line 3: empty caption for im/1.png")],
                         ids=["short-row", "empty-caption"])
def test_bad_csv_rows_are_named_before_the_model_loads(tmp_path, capsys, body, words):
    _images(tmp_path, 2)
    (tmp_path / "c.csv").write_text("image,caption\n" + body)
    assert main(["eval", "retrieval", "--data", str(tmp_path / "c.csv"), "--checkpoint", str(tmp_path / "no.pt")]) \
        == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "no.pt" not in err[0], err


def _tree(root, extra=True):
    for c, n in (("cat", 2), ("dog", 2)):
        (root / c).mkdir(parents=True)
        for j in range(n):
            _png(root / c / f"{j}.png", 5 * len(c) + j)
    if extra:
        _png(root / "cat" / "x.ppm", 7, fmt="PPM")  # torchvision reads .ppm / .pgm
        (root / "dog" / "sub").mkdir()
        _png(root / "dog" / "sub" / "2.png", 8)  # and files in sub-folders of a class
        _png(root / "dog" / "anim.gif", 9, fmt="GIF")  # but not .gif: skipped, with a note


def test_class_folders_are_read_as_torchvisions_image_folder(tmp_path, capsys):
    from torchvision.datasets import ImageFolder

    _tree(tmp_path / "data")
    classes, samples, skipped = evaluate.image_folder(str(tmp_path / "data"))
    tv = ImageFolder(str(tmp_path / "data"))
    assert classes == tv.classes and samples == tv.samples and len(samples) == 6
    assert skipped == [str(tmp_path / "data" / "dog" / "anim.gif")]
    got = _run(["eval", "zeroshot", "--data", str(tmp_path / "data")], tmp_path / "z.json")
    assert "1 file(s)" in capsys.readouterr().err and got["metrics"]["acc1"] is not None


def test_templates_from_a_pipe_and_in_clip_benchmark_syntax(tmp_path):
    _tree(tmp_path / "data", extra=False)
    (tmp_path / "t.txt").write_text("a photo of a {}.\nart of the {}\n")
    want = _run(["eval", "zeroshot", "--data", str(tmp_path / "data"), "--templates", str(tmp_path / "t.txt")],
                tmp_path / "a.json")["metrics"]
    r, w = os.pipe()
    os.write(w, b"a photo of a {c}.\nart of the {c}\n")  # as `--templates <(...)` gives it, {c} as CLIP Benchmark
    os.close(w)
    try:
        got = _run(["eval", "zeroshot", "--data", str(tmp_path / "data"), "--templates", f"/dev/fd/{r}"],
                   tmp_path / "b.json")["metrics"]
    finally:
        os.close(r)
    assert got == want


def test_acc5_under_five_classes_is_capped_on_both_routes_and_valid_json(tmp_path):
    pytest.importorskip("clip_benchmark")
    _tree(tmp_path / "data", extra=False)
    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for k, (c, j) in enumerate([(c, j) for c in ("cat", "dog") for j in range(2)]):
            data = (tmp_path / "data" / c / f"{j}.png").read_bytes()
            for ext, payload in (("png", data), ("cls", str(k // 2).encode())):
                info = tarfile.TarInfo(f"s{k:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    (tmp_path / "t.txt").write_text("a photo of a {}.\n")
    own = _run(["eval", "zeroshot", "--data", str(tmp_path / "data"), "--templates", str(tmp_path / "t.txt")],
               tmp_path / "own.json")["metrics"]
    named = _run(["eval", "zeroshot", "--dataset", "wds/two", "--data-root", str(root)], tmp_path / "n.json")
    assert named["metrics"]["acc5"] == own["acc5"] == 1.0  # 2 classes: the top 2 always hold the answer
    assert named["metrics"]["acc1"] == pytest.approx(own["acc1"], abs=1e-6)
    assert named["language"] == "en"
