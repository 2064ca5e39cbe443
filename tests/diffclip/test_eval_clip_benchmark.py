"""`diffclip eval ... --dataset NAME --data-root DIR` through LAION's CLIP Benchmark, on datasets it builds offline
from files made here: `mscoco_captions` (the paper's retrieval set; map-style, COCO annotation JSON) and a
`wds/...` webdataset (its format for every benchmark set; a stream). Metrics are compared with our own
independent implementation applied to the model's embeddings; torchrun with 2 processes equals 1 process."""

import io
import json
import sys
import tarfile

import numpy as np
import pytest
import torch
from distrun import run_diffclip
from refdata import TINY_CKPT, need

import diffclip
from diffclip import evaluate
from diffclip.cli import main

pytest.importorskip("clip_benchmark", reason="the CLIP Benchmark route needs pip install -e '.[eval]'")

CLASSES = ["dog", "cat", "zebra", "red car", "tree", "boat"]  # >= 5, so acc5 is a number, not CLIP Benchmark's NaN
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}"]
CAPTIONS = [["a dog", "a brown dog"], ["a cat on a mat"], ["a red car", "car", "an old car"], ["kitten"], ["a boat"]]


def _png(seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((36 + seed, 44, 3)) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_bits():
    return diffclip.load(need(TINY_CKPT), attn_backend="eager")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    """mscoco_captions, split test: val2014/ images + coco_test_karpathy.json, ids deliberately not in file order."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    ids = [40, 7, 19, 3, 25]
    images, annotations = [], []
    for n, (img_id, caps) in enumerate(zip(ids, CAPTIONS)):
        (root / "val2014" / f"{img_id}.png").write_bytes(_png(n))
        images.append({"id": img_id, "file_name": f"{img_id}.png"})
        annotations += [{"id": 100 * img_id + j, "image_id": img_id, "caption": c} for j, c in enumerate(caps)]
    (root / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory):
    """A CLIP Benchmark webdataset: test/{0,1}.tar (png + cls), nshards.txt, classnames, templates. 11 images."""
    root = tmp_path_factory.mktemp("wds")
    (root / "test").mkdir()
    labels = [0, 1, 2, 3, 4, 5, 0, 2, 2, 5, 1]
    shards = [range(0, 6), range(6, 11)]
    for s, items in enumerate(shards):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tar:
            for i in items:
                for ext, data in (("png", _png(20 + i)), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root, labels


def _run(args, tmp_path, name):
    out = tmp_path / name
    assert main(args + ["--json", str(out), "--checkpoint", need(TINY_CKPT), "--backend", "eager",
                        "--batch-size", "2"]) == 0
    return json.loads(out.read_text())


def _embed(model, preprocess, tokenizer, pngs, texts):
    from PIL import Image

    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs])
        img = torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1) if texts else None
    return img, txt


def test_mscoco_captions_retrieval_matches_our_metrics(tmp_path, coco_root, model_bits):
    model, preprocess, tokenizer = model_bits
    got = _run(["eval", "retrieval", "--dataset", "mscoco_captions", "--data-root", str(coco_root)], tmp_path, "r.json")
    assert got["dataset"] == "mscoco_captions" and got["split"] == "test" and got["task"] == "zeroshot_retrieval"
    # CocoCaptions orders images by id; captions stay with their image.
    order = sorted(range(len(CAPTIONS)), key=lambda n: [40, 7, 19, 3, 25][n])
    texts = [c for n in order for c in CAPTIONS[n]]
    owner = torch.tensor([k for k, n in enumerate(order) for _ in CAPTIONS[n]])
    img, txt = _embed(model, preprocess, tokenizer, [_png(n) for n in order], texts)
    want = evaluate.retrieval_metrics(img, txt, owner)
    assert set(got["metrics"]) == set(want)
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_wds_zeroshot_matches_our_metrics(tmp_path, wds_root, model_bits):
    model, preprocess, tokenizer = model_bits
    root, labels = wds_root
    got = _run(["eval", "zeroshot", "--dataset", "wds/tiny", "--data-root", str(root)], tmp_path, "z.json")
    assert got["task"] == "zeroshot_classification" and got["dataset"] == "wds/tiny"
    weights = evaluate.zeroshot_classifier(model, tokenizer, CLASSES, [t.replace("{c}", "{}") for t in TEMPLATES],
                                           torch.device("cpu"))
    img, _ = _embed(model, preprocess, tokenizer, [_png(20 + i) for i in range(len(labels))], None)
    want = evaluate.classification_metrics(img @ weights.T, torch.tensor(labels))
    assert set(got["metrics"]) == set(want)
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.parametrize("task,dataset", [("retrieval", "mscoco_captions"), ("zeroshot", "wds/tiny")])
def test_torchrun_two_processes_equal_one(tmp_path, coco_root, wds_root, task, dataset):
    """Map-style (COCO: rank subsets, caption blocks put back in image order) and stream (webdataset: filtered
    per rank; classes sharded too), 2 gloo processes against 1."""
    root = coco_root if dataset == "mscoco_captions" else wds_root[0]
    ck = need(TINY_CKPT)
    common = ["eval", task, "--dataset", dataset, "--data-root", str(root), "--checkpoint", ck, "--backend", "eager",
              "--batch-size", "2"]
    assert main(common + ["--json", str(tmp_path / "one.json")]) == 0
    run_diffclip(common + ["--json", str(tmp_path / "two.json")], cwd=tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert set(one["metrics"]) == set(two["metrics"])
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_dataset_user_errors_exit_2(tmp_path, coco_root, wds_root, capsys, monkeypatch):
    ck = need(TINY_CKPT)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["eval", "retrieval", "--dataset", "mscoco_captions"], "--dataset needs --data-root"),
        (["eval", "retrieval", "--dataset", "mscoco_captions", "--data-root", str(empty)],
         f"missing {empty / 'val2014'} (and 1 more); put the files there, or pass --download"),
        (["eval", "zeroshot", "--dataset", "mscoco_captions", "--data-root", str(coco_root)],
         "mscoco_captions is a zeroshot_retrieval dataset in CLIP Benchmark: use `diffclip eval retrieval`"),
        (["eval", "retrieval", "--dataset", "wds/tiny", "--data-root", str(wds_root[0])],
         "is a classification dataset (dataset_type.txt): use `diffclip eval zeroshot`"),
        (["eval", "zeroshot", "--dataset", "no_such_set", "--data-root", str(empty)],
         "unknown --dataset 'no_such_set'"),
        (["eval", "retrieval", "--dataset", "mscoco_captions", "--data-root", str(coco_root), "--split", "val"],
         "coco_val_karpathy.json"),
        (["eval", "zeroshot", "--dataset", "wds/tiny", "--data-root", str(wds_root[0]), "--templates", "t.txt"],
         "template file not found: t.txt"),
        (["eval", "zeroshot", "--data", str(empty), "--data-root", str(empty)], "apply to --dataset"),
    ]
    for args, words in cases:
        assert main(args + ["--checkpoint", ck, "--backend", "eager"]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("diffclip: error:") and words in err[-1], (args, err)
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "clip_benchmark.datasets", None)
    assert main(["eval", "retrieval", "--dataset", "mscoco_captions", "--data-root", str(coco_root),
                 "--checkpoint", ck]) == 2
    assert "pip install -e \".[eval]\"" in capsys.readouterr().err
