"""Batching and loader options give the same numbers as before: zero-shot in image batches with workers, the
text batch size decoupled from the image one, recall k values as a flag, CLIP Benchmark datasets with our own
--classnames/--templates ({c} syntax)."""

import io
import json
import tarfile

import numpy as np
import pytest
from refdata import TINY_CKPT, need

from diffclip.cli import main


def _png(path, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 30 + seed, 3)) * 255).astype("uint8")).save(path)


@pytest.fixture
def data(tmp_path):
    for c in ("cat", "dog", "red_car"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for j in range(2):
            _png(tmp_path / "data" / c / f"{j}.png", 3 * len(c) + j)
    return tmp_path


def _common():
    return ["--checkpoint", need(TINY_CKPT), "--backend", "eager"]


def test_zero_shot_batches_and_workers_give_the_one_batch_result(data, capsys):
    imgs = [str(p) for p in sorted((data / "data").rglob("*.png"))]
    out = []
    for extra in (["--batch-size", "64", "--num-workers", "0"], ["--batch-size", "1", "--num-workers", "2"]):
        assert main(["zero-shot", *imgs, "--labels", "cat,dog,car", "--json", *extra, *_common()]) == 0
        out.append(json.loads(capsys.readouterr().out))
    assert [r["image"] for r in out[1]] == imgs
    for a, b in zip(*out):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert [t["prob"] for t in a["top"]] == pytest.approx([t["prob"] for t in b["top"]], abs=1e-5)


def _metrics(args, path):
    assert main(args + ["--json", str(path), *_common()]) == 0
    return json.loads(path.read_text())["metrics"]


def test_text_batch_size_is_decoupled_and_recall_k_is_a_flag(data):
    zs = ["eval", "zeroshot", "--data", str(data / "data"), "--batch-size", "1"]
    a = _metrics(zs + ["--text-batch-size", "1"], data / "a.json")
    b = _metrics(zs + ["--text-batch-size", "512"], data / "b.json")
    assert a == pytest.approx(b, abs=1e-6)
    (data / "c.csv").write_text("image,caption\n" + "".join(
        f"data/{c}/{j}.png,a photo of a {c}\n" for c in ("cat", "dog", "red_car") for j in range(2)))
    got = _metrics(["eval", "retrieval", "--data", str(data / "c.csv"), "--recall-k", "3,2"], data / "r.json")
    assert sorted(got) == ["image_retrieval_recall@2", "image_retrieval_recall@3", "text_retrieval_recall@2",
                           "text_retrieval_recall@3"]


def test_dataset_route_takes_our_classnames_and_templates(data):
    pytest.importorskip("clip_benchmark")
    root = data / "wds"
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for k, c in enumerate(("cat", "dog", "red_car")):
            for ext, payload in (("png", (data / "data" / c / "0.png").read_bytes()), ("cls", str(k).encode())):
                info = tarfile.TarInfo(f"s{k:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("x\ny\nz\n")
    (root / "zeroshot_classification_templates.txt").write_text("{c}\n")
    (data / "names.txt").write_text("cat\ndog\nred car\n")
    (data / "t.txt").write_text("a photo of a {c}.\n")
    for c in ("cat", "dog", "red_car"):
        (data / "data" / c / "1.png").unlink()
    ours = _metrics(["eval", "zeroshot", "--data", str(data / "data"), "--templates", str(data / "t.txt")],
                    data / "own.json")
    named = _metrics(["eval", "zeroshot", "--dataset", "wds/w", "--data-root", str(root), "--classnames",
                      str(data / "names.txt"), "--templates", str(data / "t.txt")], data / "named.json")
    assert named["acc1"] == pytest.approx(ours["acc1"], abs=1e-6)
    assert named["mean_per_class_recall"] == pytest.approx(ours["mean_per_class_recall"], abs=1e-6)
