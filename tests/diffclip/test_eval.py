"""`diffclip eval zeroshot|retrieval` on tiny data made here, against a hand computation from the model's own
embeddings; user mistakes are one-line errors with exit status 2."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distrun import run_diffclip
from refdata import TINY_CKPT, need

import diffclip
from diffclip.cli import main


def _img(path, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40 + seed, 50, 3)) * 255).astype("uint8")).save(path)


@pytest.fixture(scope="module")
def model_bits():
    return diffclip.load(need(TINY_CKPT), attn_backend="eager")


def _embed_images(model, preprocess, paths):
    from PIL import Image

    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(p)) for p in paths])
        return F.normalize(model.encode_image(x).float(), dim=-1)


def _embed_texts(model, tokenizer, texts):
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)


def test_zeroshot_matches_hand_computation(tmp_path, model_bits):
    model, preprocess, tokenizer = model_bits
    root = tmp_path / "data"
    classes = ["golden_retriever", "tabby_cat", "zebra"]
    paths, targets = [], []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for j in range(2 + c):
            p = root / name / f"{j}.png"
            _img(p, 10 * c + j)
            paths.append(p)
            targets.append(c)
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na drawing of the {}\n")
    out = tmp_path / "zs.json"
    assert main(["eval", "zeroshot", "--data", str(root), "--templates", str(templates), "--json", str(out),
                 "--checkpoint", need(TINY_CKPT), "--backend", "eager", "--batch-size", "2"]) == 0
    got = json.loads(out.read_text())
    assert got["task"] == "zeroshot_classification" and got["dataset"] == "data" and got["images_per_s"] > 0

    names = [c.replace("_", " ") for c in classes]
    w = torch.stack([F.normalize(_embed_texts(model, tokenizer, [f"a photo of a {n}.", f"a drawing of the {n}"])
                                 .mean(0), dim=-1) for n in names])
    logits = _embed_images(model, preprocess, paths) @ w.T
    t = torch.tensor(targets)
    pred = logits.argmax(1)
    top = logits.topk(3, dim=1).indices  # k = 5 capped at 3 classes
    want = {"acc1": (pred == t).float().mean().item(), "acc5": (top == t[:, None]).any(1).float().mean().item(),
            "mean_per_class_recall": np.mean([(pred[t == c] == c).float().mean().item() for c in range(3)])}
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert got["metrics"]["acc5"] == 1.0


def test_retrieval_matches_hand_computation(tmp_path, model_bits):
    model, preprocess, tokenizer = model_bits
    (tmp_path / "im").mkdir()
    for j in range(3):
        _img(tmp_path / "im" / f"{j}.png", j)
    rows = [("im/0.png", "a dog"), ("im/1.png", "a cat on a mat"), ("im/0.png", "a brown dog"),
            ("im/2.png", "a red car"), ("im/1.png", "kitten")]
    csv = tmp_path / "caps.csv"
    csv.write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    out = tmp_path / "rt.json"
    assert main(["eval", "retrieval", "--data", str(csv), "--json", str(out), "--checkpoint", need(TINY_CKPT),
                 "--backend", "sdpa"]) == 0
    got = json.loads(out.read_text())["metrics"]

    img = _embed_images(model, preprocess, [tmp_path / "im" / f"{j}.png" for j in range(3)])
    txt = _embed_texts(model, tokenizer, [c for _, c in rows])
    owner = [int(i[3]) for i, _ in rows]
    s = (txt @ img.T).numpy()
    for k in (1, 5, 10):
        img_hits = [owner[j] in np.argsort(-s[j])[: min(k, 3)] for j in range(5)]
        txt_hits = [any(owner[j] == i for j in np.argsort(-s[:, i])[: min(k, 5)]) for i in range(3)]
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(np.mean(img_hits), abs=1e-6)
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(np.mean(txt_hits), abs=1e-6)
    assert got["image_retrieval_recall@10"] == 1.0 and got["text_retrieval_recall@10"] == 1.0


def test_eval_user_errors_exit_2(tmp_path, capsys):
    ck = need(TINY_CKPT)
    (tmp_path / "empty_cls" / "a").mkdir(parents=True)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,text\nx.png,hi\n")
    unreadable = tmp_path / "u"
    (unreadable / "cls").mkdir(parents=True)
    (unreadable / "cls" / "broken.png").write_text("not an image")
    cases = [
        (["eval", "zeroshot", "--data", str(tmp_path / "nowhere")], "not a folder"),
        (["eval", "zeroshot", "--data", str(tmp_path / "empty_cls")], "holds no images"),
        (["eval", "retrieval", "--data", str(bad_csv)], "lacks the column(s) caption, image"),
        (["eval", "zeroshot", "--data", str(unreadable)], "broken.png"),
    ]
    for args, words in cases:
        assert main(args + ["--checkpoint", ck, "--backend", "eager"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("diffclip: error:") and words in err[-1], err


def test_torchrun_two_processes_give_the_single_process_metrics(tmp_path, model_bits):
    """`torchrun --nproc-per-node 2 -m diffclip eval ...` (gloo on CPU): images sharded by rank, embeddings
    all-gathered, rank 0 writes; the metrics equal one process's."""
    root = tmp_path / "data"
    for c, name in enumerate(["a_b", "c", "d"]):
        (root / name).mkdir(parents=True)
        for j in range(3 + c):  # 12 images: an uneven split over 2 ranks per class, even overall
            _img(root / name / f"{j}.png", 7 * c + j)
    _img(root / "d" / "extra.png", 99)  # 13 images: ranks get 7 and 6
    ck = need(TINY_CKPT)
    common = ["eval", "zeroshot", "--data", str(root), "--checkpoint", ck, "--backend", "eager", "--batch-size", "2"]
    assert main(common + ["--json", str(tmp_path / "one.json")]) == 0
    proc = run_diffclip(common + ["--json", str(tmp_path / "two.json")], cwd=tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, abs=1e-6), k
    assert proc.stdout.count("acc1:") == 1  # only rank 0 prints


def test_gather_restores_the_original_order(monkeypatch):
    """Rank r holds rows r, r+world, ...; the gathered tensor is in the original order (13 rows, 3 ranks)."""
    import torch.distributed as dist

    from diffclip.distributed import gather_rows

    full = torch.arange(13 * 2, dtype=torch.float32).view(13, 2)
    world = 3
    per_rank = -(-13 // world)

    def fake_all_gather(parts, padded):
        for r in range(world):
            shard = full[r::world]
            parts[r].zero_()
            parts[r][: shard.shape[0]] = shard

    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    out = gather_rows(full[1::world], 13, 1, world)
    assert torch.equal(out, full) and per_rank == 5
