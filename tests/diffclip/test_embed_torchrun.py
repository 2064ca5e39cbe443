"""`diffclip embed` under `torchrun --nproc-per-node 2` (gloo on CPU): each rank writes its shard, rank 0 the merged
lists and index.json; `diffclip.embeddings.read` gives the one-process array back; a later run of either layout
replaces the other's files."""

import json
import os

import numpy as np
import pytest
from distrun import run_diffclip
from refdata import TINY_CKPT, need

from diffclip import embeddings

CAPTIONS = ["a dog", "a cat", "a red car", "two birds", "a boat"]  # 5 captions, 5 images: ranks hold 3 and 2


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.fromarray((rng.random((40 + 3 * i, 50, 3)) * 255).astype("uint8")).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "caps.txt").write_text("\n".join(CAPTIONS) + "\n")
    return tmp_path


def _embed(cwd, out, procs):
    return run_diffclip(["embed", "imgs", "--out", out, "--text", "caps.txt", "--batch-size", "2",
                         "--checkpoint", need(TINY_CKPT), "--backend", "eager"], cwd=cwd, procs=procs)


def test_two_ranks_write_shards_and_an_index_equal_to_one_process(folder):
    _embed(folder, "one", 1)
    r = _embed(folder, "two", 2)
    assert r.stdout.count("wrote 5 image embeddings") == 1  # rank 0 reports
    files = sorted(f for f in os.listdir(folder / "two"))
    assert files == ["image_embeddings.0-of-2.npy", "image_embeddings.1-of-2.npy", "index.json", "paths.txt",
                     "text_embeddings.0-of-2.npy", "text_embeddings.1-of-2.npy", "texts.txt"]
    idx = json.loads((folder / "two" / "index.json").read_text())
    assert idx["world_size"] == 2 and [s["rows"] for s in idx["image"]["shards"]] == [3, 2]
    assert np.load(folder / "two" / "image_embeddings.1-of-2.npy").shape == (2, 64)
    for kind in ("image", "text"):
        one, items_one = embeddings.read(str(folder / "one"), kind)
        two, items_two = embeddings.read(str(folder / "two"), kind)
        assert items_one == items_two and len(items_one) == 5
        np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    assert embeddings.read(str(folder / "two"), "text")[1] == CAPTIONS

    # One process into the sharded folder: the shards and the index go, the plain layout stays alone.
    _embed(folder, "two", 1)
    assert sorted(os.listdir(folder / "two")) == ["image_embeddings.npy", "paths.txt", "text_embeddings.npy",
                                                  "texts.txt"]


def test_read_refuses_an_index_that_disagrees_with_its_shards(tmp_path):
    np.save(tmp_path / "image_embeddings.0-of-2.npy", np.zeros((2, 4), np.float32))
    np.save(tmp_path / "image_embeddings.1-of-2.npy", np.zeros((2, 4), np.float32))
    (tmp_path / "paths.txt").write_text("a\nb\nc\n")
    (tmp_path / "index.json").write_text(json.dumps(embeddings.index(2, {"image": 3}, 4, True)))
    with pytest.raises(ValueError, match="image_embeddings.1-of-2.npy has 2 rows, the index says 1"):
        embeddings.read(str(tmp_path))
    with pytest.raises(ValueError, match="kind must be one of"):
        embeddings.read(str(tmp_path), "audio")
